"""The weights cache ($HIERAX_HOME/weights): where an entry's file lives, whether it is there, and
`import_file`, which puts a file copied from elsewhere (an air-gapped machine's USB stick) into the cache under
its registry name once its sha256 matches the registry. Torch-free.

A file appears under its final name only complete and checked (through atomic_write), so an interrupted copy
never looks cached."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from hierax.atomic import atomic_write
from hierax.errors import DownloadError, HieraxError, ModelNotFoundError
from hierax.weights import catalog
from hierax.weights.catalog import WeightsEntry
from hierax.weights.formats import MODEL_FILE, looks_like_path
from hierax.weights.paths import cache_dir

logger = logging.getLogger(__name__)
CHUNK = 1 << 20


def cached_path(entry: WeightsEntry) -> Path:
    """The file an entry resolves to: its local path, or its place in the cache."""
    return Path(entry.path) if entry.path else cache_dir() / entry.filename


def is_cached(entry: WeightsEntry) -> bool:
    """Whether the entry's file is on this machine."""
    return cached_path(entry).is_file()


def locate(name_or_path: str | Path) -> tuple[Path | None, WeightsEntry | None]:
    """(the local file, its registry entry) for a --model value, without downloading: an existing file, a
    training run's folder (its model.pt), a published file's name, or a registry name. The path is None for an
    entry whose file is not on this machine; ModelNotFoundError when it is neither a file nor a known name."""
    path, name = Path(name_or_path).expanduser(), str(name_or_path)
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE, None
        if catalog.resolve_or_none(name) is None:  # a registry name wins over a folder that happens to share it
            raise ModelNotFoundError(f"{path} is a folder without a {MODEL_FILE}: pass the model file itself")
    if path.is_file():
        return path, catalog.entry_for_filename(path.name)
    if looks_like_path(name):
        entry = None
        if path.name == name:  # no folder in it: a published file's name stands for its entry
            entry = catalog.entry_for_filename(name) or catalog.resolve_or_none(path.stem)
        if entry is None:
            raise ModelNotFoundError(f"No such checkpoint file: {name}")
    else:
        entry = catalog.resolve(name)
    return (cached_path(entry) if is_cached(entry) else None), entry


def copy_hashing(source: BinaryIO, out: BinaryIO, on_chunk: Callable[[int], object] | None = None) -> str:
    """Copy `source` to `out` in chunks and return the sha256 of what was copied; `on_chunk(n)` after each."""
    digest = hashlib.sha256()
    while chunk := source.read(CHUNK):
        out.write(chunk)
        digest.update(chunk)
        if on_chunk is not None:
            on_chunk(len(chunk))
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's content, as registry entries record it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _entry_for_import(file: Path, digest: str, name: str | None) -> WeightsEntry:
    """The registry entry `file` (of checksum `digest`) is a copy of; HieraxError when it matches none."""
    if name is not None:
        entry = catalog.resolve(name)
        if entry.path:
            raise HieraxError(f"'{entry.name}' is registered with the local file {entry.path}: it needs no import")
        if entry.sha256 and entry.sha256 != digest:
            raise HieraxError(
                f"{file} has sha256 {digest}, but '{entry.name}' expects {entry.sha256}: it is another file or a "
                "damaged copy. Nothing was imported."
            )
        if not entry.sha256:
            logger.warning("'%s' has no registered sha256: %s is imported unchecked", entry.name, file)
        return entry
    entry = catalog.entry_for_sha256(digest)
    if entry is not None:
        return entry
    named = catalog.entry_for_filename(file.name)
    if named is not None and named.sha256:
        raise HieraxError(
            f"{file} is named like '{named.name}' but its sha256 is {digest}, not {named.sha256}: a damaged or "
            "different copy. Nothing was imported; copy the file again."
        )
    raise HieraxError(
        f"{file} (sha256 {digest}) matches no registered weights. Use it directly with --model {file}, or "
        f"register it under a name of your choice: `hierax weights register NAME --path {file}`."
    )


def import_file(file: str | Path, name: str | None = None) -> tuple[WeightsEntry, Path]:
    """Copy `file` into the cache under its registry entry's file name: the entry whose sha256 the file has,
    or the entry `name` (whose sha256, when registered, it must have). Returns (entry, cached path).

    A file that matches no entry is refused (HieraxError): a file of one's own needs no import; pass its path
    as --model or register it (`register_weights(..., path=...)` / `hierax weights register`)."""
    file = Path(file)
    if not file.is_file():
        raise HieraxError(f"no such file: {file}")
    digest = file_sha256(file)
    entry = _entry_for_import(file, digest, name)
    target = cached_path(entry)
    if target.is_file() and file_sha256(target) == digest:
        logger.info("'%s' is already cached at %s", entry.name, target)
        return entry, target

    def copy(tmp: str) -> None:
        with open(file, "rb") as source, open(tmp, "wb") as out:
            copied = copy_hashing(source, out)
        if copied != digest:
            raise DownloadError(f"{file} changed while it was copied; nothing was imported. Try again.")

    atomic_write(target, copy)
    logger.info("Imported %s as '%s' into %s", file, entry.name, target)
    return entry, target
