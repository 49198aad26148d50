"""Where hierax keeps its per-user files: `$HIERAX_HOME` (default `~/.cache/hierax`) holds `weights/` (downloaded
and imported checkpoints), `exports/` (files exported once for a runtime backend) and `registry.json` (the weights
users registered with `persist=True` or `hierax weights register`). Read from the environment on every call, so a
process that changes HIERAX_HOME sees the new place at once."""

from __future__ import annotations

import os
from pathlib import Path


def hierax_home() -> Path:
    """$HIERAX_HOME, default ~/.cache/hierax."""
    return Path(os.environ.get("HIERAX_HOME") or Path.home() / ".cache" / "hierax")


def cache_dir() -> Path:
    """Where downloaded and imported weights live: $HIERAX_HOME/weights."""
    return hierax_home() / "weights"


def exports_dir() -> Path:
    """Where runtime backends keep the files they exported once: $HIERAX_HOME/exports."""
    return hierax_home() / "exports"


def registry_path() -> Path:
    """The user registry file: $HIERAX_HOME/registry.json."""
    return hierax_home() / "registry.json"
