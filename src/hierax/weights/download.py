"""Download registered weights into the per-user cache, verifying sha256, with atomic renames.

The cache is `$HIERAX_HOME/weights` (default `~/.cache/hierax/weights`). A file appears under its final name
only after its checksum matched, so an interrupted or corrupt download never looks cached. With
`HIERAX_OFFLINE=1` or no network, the error names the expected file and where to put it."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from hierax.errors import DownloadError, OfflineError
from hierax.weights.catalog import WeightsEntry

logger = logging.getLogger(__name__)
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """Where downloaded weights live: $HIERAX_HOME/weights, default ~/.cache/hierax/weights."""
    home = os.environ.get("HIERAX_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "hierax")
    return Path(home) / "weights"


def cached_path(entry: WeightsEntry) -> Path:
    """The file an entry resolves to: its local path, or its place in the cache."""
    return Path(entry.path) if entry.path else cache_dir() / entry.filename


def is_cached(entry: WeightsEntry) -> bool:
    return cached_path(entry).is_file()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _offline() -> bool:
    return os.environ.get("HIERAX_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _missing_message(entry: WeightsEntry, reason: str) -> str:
    sha = f" (sha256 {entry.sha256})" if entry.sha256 else ""
    return (
        f"{reason}: cannot download '{entry.name}'. Get the file {entry.filename}{sha} from {entry.url} "
        f"and put it at {cached_path(entry)}, or set HIERAX_HOME to a folder whose weights/ holds it."
    )


def fetch(entry: WeightsEntry, *, progress: bool = True) -> Path:
    """The local path of an entry's file, downloading it first if it is not cached."""
    target = cached_path(entry)
    if entry.path:
        if not target.is_file():
            raise DownloadError(f"'{entry.name}' points at {target}, which does not exist")
        return target
    if target.is_file():
        return target
    if _offline():
        raise OfflineError(_missing_message(entry, "HIERAX_OFFLINE is set"))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _stream(entry, out, progress)
        if entry.sha256 and digest != entry.sha256:
            raise DownloadError(
                f"sha256 mismatch for {entry.filename}: expected {entry.sha256}, got {digest}. "
                "The download was discarded; try again, or check the registered checksum."
            )
        os.replace(tmp, target)
        logger.info("Saved %s to %s", entry.name, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _stream(entry: WeightsEntry, out, progress: bool) -> str:
    """Copy the entry's URL into `out`, returning the sha256 of what was received."""
    digest = hashlib.sha256()
    request = urllib.request.Request(entry.url, headers={"User-Agent": "hierax"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            expected = int(response.headers.get("Content-Length") or 0)
            received = 0
            with tqdm(
                total=expected or None, unit="B", unit_scale=True, desc=entry.filename, disable=not progress
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise DownloadError(f"HTTP {err.code} while downloading {entry.url}: {err.reason}") from None
    except urllib.error.URLError as err:
        raise OfflineError(_missing_message(entry, f"no network ({err.reason})")) from None
    except (OSError, ValueError, http.client.HTTPException) as err:
        raise DownloadError(f"download of {entry.url} broke off: {err}. Nothing was saved; try again.") from None
    if expected and received != expected:
        raise DownloadError(
            f"download of {entry.url} broke off after {received:,} of {expected:,} bytes. Nothing was saved; try again."
        )
    return digest.hexdigest()
