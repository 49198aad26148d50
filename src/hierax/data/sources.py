"""Expand what a user points hierax at into one ordered list of image paths.

API:
    expand_sources(sources, *, recursive=True, extensions=IMAGE_EXTENSIONS) -> list[str]
    find_images(sources, ...) -> list[str]: the same, but a HieraxError naming the sources when they hold no image

Each source is, in turn:
- an existing file with an image extension: kept as given;
- a folder: every image file under it (recursively unless recursive=False), sorted by path;
- a `.txt` / `.lst` file: one path per line (blank lines and `#` comments skipped);
- a `.csv` file: the `path` column when the header has one, otherwise the first column;
- a glob pattern (`*`, `?`, `[...]`, `**`): its matches, sorted, images only.

Relative paths in a list file are resolved against the list file's folder when they exist there, otherwise kept
as written (relative to the working directory). Missing files named in a list stay in the output so the run
reports them as errors. A command-line source that names nothing at all raises HieraxError, since it is a typo,
not a bad photo; a folder or pattern that holds no image is logged by name. Order follows the sources; a file
named twice, by the same or another spelling (`photos/a.jpg`, `./photos/../photos/a.jpg`, or via a folder and a
glob), keeps its first position and spelling. Spellings are compared as absolute, normalised paths (no file-system
calls, so millions of paths stay cheap); two symbolic links to one file still count as two files.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from collections.abc import Iterable, Iterator

from hierax.data.images import IMAGE_EXTENSIONS
from hierax.errors import HieraxError

logger = logging.getLogger(__name__)

LIST_EXTENSIONS = frozenset({".txt", ".lst"})
CSV_EXTENSIONS = frozenset({".csv"})
_GLOB_CHARS = frozenset("*?[")


def is_image_path(path: str | os.PathLike, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> bool:
    """Whether the file name ends with one of the image extensions (case-insensitive)."""
    return os.path.splitext(str(path))[1].lower() in extensions


def _wanted(name: str, extensions: frozenset[str]) -> bool:
    return not name.startswith(".") and is_image_path(name, extensions)


def _walk_folder(folder: str, recursive: bool, extensions: frozenset[str]) -> list[str]:
    """Image files under `folder`, sorted; hidden files and folders are skipped."""
    found: list[str] = []
    if recursive:
        for root, dirs, files in os.walk(folder, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found.extend(os.path.join(root, f) for f in files if _wanted(f, extensions))
    else:
        with os.scandir(folder) as entries:
            found.extend(e.path for e in entries if e.is_file() and _wanted(e.name, extensions))
    return sorted(found)


def _resolve_listed(entry: str, list_dir: str) -> str:
    """A path from a list file: relative to the list's folder when it exists there, else as written."""
    if os.path.isabs(entry):
        return entry
    beside = os.path.join(list_dir, entry)
    return beside if os.path.exists(beside) else entry


def read_path_list(list_file: str | os.PathLike) -> list[str]:
    """Paths named in a .txt/.lst file (one per line) or a .csv file (`path` column, else the first column)."""
    list_file = str(list_file)
    list_dir = os.path.dirname(list_file)
    entries: list[str] = []
    try:
        with open(list_file, encoding="utf-8-sig", newline="") as fh:
            if os.path.splitext(list_file)[1].lower() in CSV_EXTENSIONS:
                rows = [row for row in csv.reader(fh) if row and not row[0].lstrip().startswith("#")]
                column = 0
                if rows and "path" in [c.strip().lower() for c in rows[0]]:
                    column = [c.strip().lower() for c in rows[0]].index("path")
                    rows = rows[1:]
                entries = [row[column].strip() for row in rows if len(row) > column and row[column].strip()]
            else:
                entries = [s for line in fh if (s := line.strip()) and not s.startswith("#")]
    except OSError as err:
        raise HieraxError(f"cannot read the path list {list_file}: {err.strerror or err}") from None
    return [_resolve_listed(e, list_dir) for e in entries]


def _expand_one(source: str, recursive: bool, extensions: frozenset[str]) -> Iterator[str]:
    if os.path.isdir(source):
        found = _walk_folder(source, recursive, extensions)
        if not found:
            logger.warning("folder %s holds no image files (%s)", source, ", ".join(sorted(extensions)))
        yield from found
    elif os.path.isfile(source):
        suffix = os.path.splitext(source)[1].lower()
        if suffix in LIST_EXTENSIONS | CSV_EXTENSIONS:
            yield from read_path_list(source)
        else:
            yield source
    elif _GLOB_CHARS & set(source):
        found = glob.glob(source, recursive=True)
        matches = sorted(p for p in found if os.path.isfile(p) and is_image_path(p, extensions))
        if not matches:
            logger.warning("pattern %s matched no image files", source)
        yield from matches
    else:
        raise HieraxError(f"no such file, folder or pattern: {source}")


def expand_sources(
    sources: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    recursive: bool = True,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> list[str]:
    """Every image path named by `sources` (files, folders, globs, list files), in order, without duplicates."""
    sources = [sources] if isinstance(sources, str | os.PathLike) else list(sources)
    exts = frozenset(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    seen: set[str] = set()
    paths: list[str] = []
    for source in sources:
        for path in _expand_one(os.fspath(source), recursive, exts):
            key = _same_file_key(path)
            if key not in seen:
                seen.add(key)
                paths.append(path)
    logger.debug("expanded %d source(s) into %d path(s)", len(sources), len(paths))
    return paths


def _same_file_key(path: str) -> str:
    """One key for every spelling of a path: absolute and normalised (`a/../a/x.jpg` is `a/x.jpg`)."""
    return os.path.normcase(os.path.abspath(path))


def find_images(
    sources: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    recursive: bool = True,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> list[str]:
    """expand_sources for a job that needs images: a HieraxError naming the sources when they hold none, so the
    job stops before it loads a model or writes a file."""
    named = [os.fspath(s) for s in ([sources] if isinstance(sources, str | os.PathLike) else list(sources))]
    extensions = list(extensions)
    paths = expand_sources(named, recursive=recursive, extensions=extensions)
    if not paths:
        shown = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
        kinds = ", ".join(sorted(extensions))
        raise HieraxError(f"no images found in {shown or 'the inputs'} (image files end in {kinds})")
    return paths
