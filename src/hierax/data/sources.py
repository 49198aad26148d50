"""Expand what a user points hierax at into one ordered list of image paths.

API:
    expand_sources(sources, *, recursive=True, extensions=IMAGE_EXTENSIONS) -> list[str]
    find_images(sources, ...) -> list[str]: the same, but a HieraxError naming the sources when they hold no image
    find_image_rows(sources, ...) -> (paths, rows): find_images with, per path, the other columns of its CSV row
        (an empty mapping for paths that came from anywhere else)

Each source is, in turn:
- an existing file with an image extension: kept as given;
- a folder: every image file under it (recursively unless recursive=False), sorted by path;
- a `.txt` / `.lst` file: one path per line (blank lines and `#` comments skipped);
- a `.csv` file: the `path` column when the header has one, otherwise the first column. A first row that names
  a `path`, `latitude`, `longitude` or `date` column is a header, and then `find_image_rows` also returns each
  row's other columns by name (where and when a photo was taken, say);
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
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType

from hierax.data.images import IMAGE_EXTENSIONS
from hierax.errors import HieraxError

logger = logging.getLogger(__name__)

LIST_EXTENSIONS = frozenset({".txt", ".lst"})
CSV_EXTENSIONS = frozenset({".csv"})
_GLOB_CHARS = frozenset("*?[")
# Columns whose name in a CSV's first row marks it as a header even without a `path` column.
HEADER_COLUMNS = frozenset({"path", "latitude", "longitude", "date"})
NO_COLUMNS: Mapping[str, str] = MappingProxyType({})  # the row of a path that came from no CSV row

Row = Mapping[str, str]


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


def _csv_rows(fh) -> list[tuple[str, Row]]:
    """(path entry, other columns) of each CSV row: the `path` column, else the first; columns by header name
    when the first row is a header (it names one of HEADER_COLUMNS)."""
    rows = [row for row in csv.reader(fh) if row and not row[0].lstrip().startswith("#")]
    header = [c.strip() for c in rows[0]] if rows else []
    names = [c.lower() for c in header]
    if not HEADER_COLUMNS & set(names):
        return [(row[0].strip(), NO_COLUMNS) for row in rows if row[0].strip()]
    column = names.index("path") if "path" in names else 0
    out = []
    for row in rows[1:]:
        if len(row) > column and row[column].strip():
            others = {h: v for i, (h, v) in enumerate(zip(header, row)) if i != column and h}
            out.append((row[column].strip(), others or NO_COLUMNS))
    return out


def read_path_rows(list_file: str | os.PathLike) -> list[tuple[str, Row]]:
    """(path, other columns) for each entry of a .txt/.lst list (no columns) or a .csv list (see the module
    docstring); relative paths resolved as read_path_list does."""
    list_file = str(list_file)
    list_dir = os.path.dirname(list_file)
    try:
        with open(list_file, encoding="utf-8-sig", newline="") as fh:
            if os.path.splitext(list_file)[1].lower() in CSV_EXTENSIONS:
                entries = _csv_rows(fh)
            else:
                entries = [(s, NO_COLUMNS) for line in fh if (s := line.strip()) and not s.startswith("#")]
    except OSError as err:
        raise HieraxError(f"cannot read the path list {list_file}: {err.strerror or err}") from None
    return [(_resolve_listed(e, list_dir), row) for e, row in entries]


def read_path_list(list_file: str | os.PathLike) -> list[str]:
    """Paths named in a .txt/.lst file (one per line) or a .csv file (`path` column, else the first column)."""
    return [path for path, _ in read_path_rows(list_file)]


def _expand_one(source: str, recursive: bool, extensions: frozenset[str]) -> Iterator[tuple[str, Row]]:
    if os.path.isdir(source):
        found = _walk_folder(source, recursive, extensions)
        if not found:
            logger.warning("folder %s holds no image files (%s)", source, ", ".join(sorted(extensions)))
        yield from ((p, NO_COLUMNS) for p in found)
    elif os.path.isfile(source):
        suffix = os.path.splitext(source)[1].lower()
        if suffix in LIST_EXTENSIONS | CSV_EXTENSIONS:
            yield from read_path_rows(source)
        else:
            yield source, NO_COLUMNS
    elif _GLOB_CHARS & set(source):
        found = glob.glob(source, recursive=True)
        matches = sorted(p for p in found if os.path.isfile(p) and is_image_path(p, extensions))
        if not matches:
            logger.warning("pattern %s matched no image files", source)
        yield from ((p, NO_COLUMNS) for p in matches)
    else:
        raise HieraxError(f"no such file, folder or pattern: {source}")


def _expand(sources, recursive: bool, extensions: Iterable[str]) -> tuple[list[str], list[Row]]:
    sources = [sources] if isinstance(sources, str | os.PathLike) else list(sources)
    exts = frozenset(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    seen: set[str] = set()
    paths: list[str] = []
    rows: list[Row] = []
    for source in sources:
        for path, row in _expand_one(os.fspath(source), recursive, exts):
            key = _same_file_key(path)
            if key not in seen:
                seen.add(key)
                paths.append(path)
                rows.append(row)
    logger.debug("expanded %d source(s) into %d path(s)", len(sources), len(paths))
    return paths, rows


def expand_sources(
    sources: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    recursive: bool = True,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> list[str]:
    """Every image path named by `sources` (files, folders, globs, list files), in order, without duplicates."""
    return _expand(sources, recursive, extensions)[0]


def _same_file_key(path: str) -> str:
    """One key for every spelling of a path: absolute and normalised (`a/../a/x.jpg` is `a/x.jpg`)."""
    return os.path.normcase(os.path.abspath(path))


def find_image_rows(
    sources: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    recursive: bool = True,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> tuple[list[str], list[Row]]:
    """find_images, and for each path the other columns of the CSV row that named it (NO_COLUMNS otherwise).
    A path named twice keeps its first row."""
    named = [os.fspath(s) for s in ([sources] if isinstance(sources, str | os.PathLike) else list(sources))]
    extensions = list(extensions)
    paths, rows = _expand(named, recursive, extensions)
    if not paths:
        shown = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
        kinds = ", ".join(sorted(extensions))
        raise HieraxError(f"no images found in {shown or 'the inputs'} (image files end in {kinds})")
    return paths, rows


def find_images(
    sources: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    recursive: bool = True,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> list[str]:
    """expand_sources for a job that needs images: a HieraxError naming the sources when they hold none, so the
    job stops before it loads a model or writes a file."""
    return find_image_rows(sources, recursive=recursive, extensions=extensions)[0]
