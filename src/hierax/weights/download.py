"""Download registered weights into the per-user cache ($HIERAX_HOME/weights), verifying sha256. Torch-free.

The download is written through atomic_write and checked before the rename, so an interrupted or corrupt
download never looks cached. With `HIERAX_OFFLINE=1` or no network, the error names the expected file, its
checksum and the two ways to get it there (`hierax weights download` elsewhere, then `hierax weights import`)."""

from __future__ import annotations

import http.client
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from hierax.atomic import atomic_write
from hierax.errors import DownloadError, OfflineError
from hierax.weights.cache import cached_path, copy_hashing
from hierax.weights.catalog import WeightsEntry

logger = logging.getLogger(__name__)


def _offline() -> bool:
    return os.environ.get("HIERAX_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _missing_message(entry: WeightsEntry, reason: str) -> str:
    sha = f" (sha256 {entry.sha256})" if entry.sha256 else ""
    return (
        f"{reason}: cannot download '{entry.name}'. On a connected machine run `hierax weights download "
        f"{entry.name}` (or get {entry.filename}{sha} from {entry.url}), copy the file here and run "
        f"`hierax weights import {entry.filename}`; or put it at {cached_path(entry)}."
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

    def download(tmp: str) -> None:
        with open(tmp, "wb") as out:
            digest = _stream(entry, out, progress)
        if entry.sha256 and digest != entry.sha256:
            raise DownloadError(
                f"sha256 mismatch for {entry.filename}: expected {entry.sha256}, got {digest}. "
                "The download was discarded; try again, or check the registered checksum."
            )

    atomic_write(target, download)
    logger.info("Saved %s to %s", entry.name, target)
    return target


def _stream(entry: WeightsEntry, out, progress: bool) -> str:
    """Copy the entry's URL into `out`, returning the sha256 of what was received."""
    request = urllib.request.Request(entry.url, headers={"User-Agent": "hierax"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            expected = int(response.headers.get("Content-Length") or 0)
            received = 0

            def advance(n: int) -> None:
                nonlocal received
                received += n
                bar.update(n)

            with tqdm(
                total=expected or None, unit="B", unit_scale=True, desc=entry.filename, disable=not progress
            ) as bar:
                digest = copy_hashing(response, out, advance)
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
    return digest
