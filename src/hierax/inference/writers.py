"""Chunked, resumable output writers for predictions and embeddings, plus the errors file.

The rule: a file under its final name is complete, or it is the previous complete version. Rows are written in
chunks (every `chunk_size` rows or FLUSH_SECONDS), and a finished chunk is on disk (fsync) before the next one
starts, so a crash or Ctrl-C keeps every finished row; the unfinished state lives beside the final name, and
`close()` publishes it through `hierax.atomic.atomic_write`:
- `.csv` and `.jsonl` (and the errors file) are appended to `<name>.partial`; close() publishes it as `<name>`.
  On resume a half-written last line is cut off first.
- `.parquet` and `.npy` cannot be appended to, so each chunk becomes a Parquet part file in `<name>.parts/`,
  itself written atomically; close() merges the parts into the final file. `.npy` holds the `embedding` column
  as (N, D) float32; its paths go to `<stem>.paths.txt` and other array columns to `<stem>.<column>.npy`.
- The unfinished state, when there is one, is the newest: `--resume` continues it (a resumed run first copies
  a finished output into it), and `done_paths(output)` reads it. A run that starts afresh replaces it.
- A run that fails (an exception, Ctrl-C) keeps its finished chunks in the unfinished state without publishing
  them, for `--resume`.
"""

from __future__ import annotations

import abc
import csv
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from hierax.atomic import atomic_write
from hierax.errors import HieraxError
from hierax.inference.formats import (
    Row,
    paths_in,
    read_rows,
    sidecar,
    suffix_of,
    write_all,
    write_csv_rows,
    write_jsonl_rows,
    write_parquet,
)

logger = logging.getLogger(__name__)


def partial_path(path: str | os.PathLike) -> Path:
    """Where a .csv / .jsonl output (or an errors file) grows until close() publishes it."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def parts_dir(path: str | os.PathLike) -> Path:
    """The folder holding the finished chunks of a .parquet / .npy output that is still being written."""
    path = Path(path)
    return path.with_name(path.name + ".parts")


def _cut_partial_line(path: Path) -> None:
    """Truncate a text file after its last newline (a crash may leave half a row)."""
    with open(path, "rb+") as fh:
        data_end = fh.seek(0, os.SEEK_END)
        pos = data_end
        while pos > 0:
            step = min(65536, pos)
            fh.seek(pos - step)
            chunk = fh.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                pos = pos - step + nl + 1
                break
            pos -= step
        if pos != data_end:
            logger.warning("%s: dropping a half-written last line", path)
            fh.truncate(pos)


class RowWriter(abc.ABC):
    """Base writer: buffer rows and write them out every `chunk_size` rows or `FLUSH_SECONDS`, whichever comes
    first (slow CPU runs lose little on a hard crash). As a context manager it publishes on success and keeps
    the finished chunks unpublished on an exception."""

    FLUSH_SECONDS = 30.0

    def __init__(self, path: str | os.PathLike, columns: Sequence[str], *, resume: bool = False, chunk_size: int = 256):
        self.path = Path(path)
        self.columns = list(columns)
        self.resume = resume
        self.chunk_size = max(1, chunk_size)
        self.rows_written = 0
        self._buffer: list[Row] = []
        self._last_flush = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, rows: Iterable[Row]) -> None:
        """Queue rows; a full chunk (or a chunk older than FLUSH_SECONDS) is written out at once."""
        self._buffer.extend(rows)
        if len(self._buffer) >= self.chunk_size or time.monotonic() - self._last_flush >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows to disk now, durably."""
        if self._buffer:
            self._write_chunk(self._buffer)
            self.rows_written += len(self._buffer)
            self._buffer = []
        self._last_flush = time.monotonic()

    @abc.abstractmethod
    def _write_chunk(self, rows: list[Row]) -> None:
        """Write one chunk of rows durably to the unfinished state."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Close open files; the unfinished state stays as it is."""

    @abc.abstractmethod
    def _publish(self) -> None:
        """Turn the unfinished state into the final file, atomically, and remove the state."""

    @abc.abstractmethod
    def _kept_in(self) -> Path:
        """Where the unfinished state lives."""

    def close(self) -> None:
        """Write what is buffered and publish the output under its final name."""
        self.flush()
        self._release()
        self._publish()

    def abandon(self) -> None:
        """Write what is buffered and stop without publishing: `--resume` continues from here."""
        self.flush()
        self._release()
        logger.warning(
            "%s is not complete: its finished rows are kept in %s, and --resume continues from there",
            self.path,
            self._kept_in(),
        )

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def _complete_text(path: Path) -> str:
    """A text file's content up to its last newline (without a half-written last row), read-only."""
    text = path.read_text("utf-8")
    return text[: text.rfind("\n") + 1]


class _AppendWriter(RowWriter):
    """A text output appended to `<name>.partial`, each chunk flushed and fsync'd, published by close()."""

    _format = staticmethod(write_csv_rows)

    def __init__(self, path, columns, *, resume=False, chunk_size=256):
        super().__init__(path, columns, resume=resume, chunk_size=chunk_size)
        self.partial = partial_path(self.path)
        if resume and not self.partial.exists() and self.path.exists():
            shutil.copyfile(self.path, self.partial)
        continuing = resume and self.partial.exists() and self.partial.stat().st_size > 0
        if continuing:
            _cut_partial_line(self.partial)
            self._check_continuable()
        self._fh = open(self.partial, "a" if continuing else "w", encoding="utf-8", newline="")
        if not continuing:
            self._format(self._fh, self.columns, [], header=True)
            self._sync()

    def _check_continuable(self) -> None:
        """HieraxError when the file being resumed cannot take this run's rows."""

    def _write_chunk(self, rows):
        self._format(self._fh, self.columns, rows)
        self._sync()

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def _release(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def _publish(self) -> None:
        atomic_write(self.path, lambda tmp: shutil.copyfile(self.partial, tmp))
        self.partial.unlink()

    def _kept_in(self) -> Path:
        return self.partial


class CsvWriter(_AppendWriter):
    """CSV rows with a header line; refuses to resume into a file with other columns. Missing values are
    written empty."""

    def _check_continuable(self) -> None:
        with open(self.partial, encoding="utf-8", newline="") as fh:
            header = next(csv.reader(fh), [])
        if header != self.columns:
            raise HieraxError(f"cannot resume {self.path}: its columns differ from this run's ({header[:4]}...)")


class JsonlWriter(_AppendWriter):
    """One JSON object per line."""

    _format = staticmethod(write_jsonl_rows)


class PartsWriter(RowWriter):
    """Writes each chunk as an atomic Parquet part; close() merges the parts into the final file. A resumed run
    whose output is finished starts its parts from that output, so the parts alone are the newest state."""

    def __init__(self, path, columns, *, resume=False, chunk_size=256):
        super().__init__(path, columns, resume=resume, chunk_size=chunk_size)
        self.parts = parts_dir(self.path)
        if not resume and self.parts.exists():
            shutil.rmtree(self.parts)
        finished = resume and not self.parts.exists() and self.path.exists()
        self.parts.mkdir(parents=True, exist_ok=True)
        self._next = len(list(self.parts.glob("part-*.parquet")))
        if finished:
            self._write_chunk(read_rows(self.path))

    def _write_chunk(self, rows):
        write_parquet(self.parts / f"part-{self._next:06d}.parquet", rows, self.columns)
        self._next += 1

    def _release(self) -> None:
        pass

    def _kept_in(self) -> Path:
        return self.parts

    def _publish(self) -> None:
        rows: list[Row] = []
        for part in sorted(self.parts.glob("part-*.parquet")):
            rows.extend(read_rows(part))
        write_all(self.path, rows, self.columns)
        shutil.rmtree(self.parts)


def done_paths(path: str | os.PathLike) -> set[str]:
    """Paths already written to `path`, for --resume: its unfinished state when it has one (the newest), else
    the finished file."""
    path = Path(path)
    partial, parts = partial_path(path), parts_dir(path)
    if partial.exists():
        text = _complete_text(partial)
        if suffix_of(path) == ".jsonl":
            return {json.loads(line)["path"] for line in text.splitlines() if line}
        return {r["path"] for r in csv.DictReader(io.StringIO(text, newline=""))}
    if parts.exists():
        return {p for part in parts.glob("part-*.parquet") for p in paths_in(part)}
    return paths_in(path) if path.exists() else set()


def done_rows(path: str | os.PathLike) -> list[Row]:
    """Rows already written to `path` (its unfinished state when it has one, else the finished file), for a
    --resume that needs more of them than their paths (CSV values come back as strings)."""
    path = Path(path)
    partial, parts = partial_path(path), parts_dir(path)
    if partial.exists():
        text = _complete_text(partial)
        if suffix_of(path) == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line]
        return list(csv.DictReader(io.StringIO(text, newline="")))
    if parts.exists():
        return [row for part in sorted(parts.glob("part-*.parquet")) for row in read_rows(part)]
    return read_rows(path) if path.exists() else []


def open_writer(
    path: str | os.PathLike, columns: Sequence[str], *, resume: bool = False, chunk_size: int = 256
) -> RowWriter:
    """The writer for the output format `path`'s suffix names (.csv, .jsonl, .parquet, .npy)."""
    suffix = suffix_of(path)
    if suffix == ".csv":
        return CsvWriter(path, columns, resume=resume, chunk_size=chunk_size)
    if suffix == ".jsonl":
        return JsonlWriter(path, columns, resume=resume, chunk_size=chunk_size)
    if suffix in (".parquet", ".npy"):
        return PartsWriter(path, columns, resume=resume, chunk_size=chunk_size)
    raise HieraxError(f"unsupported output format '{suffix}': use .csv, .jsonl, .parquet (or .npy for embeddings)")


def merge_outputs(shards: Sequence[Path], output: Path, columns: Sequence[str], order: Sequence[str], *, resume: bool):
    """Merge shard outputs (and, on resume, the existing output) into `output`, rows sorted by input `order`;
    the shards are deleted afterwards."""
    rows = read_rows(output) if resume and output.exists() else []
    for shard in shards:
        if shard.exists():
            rows.extend(read_rows(shard))
    position = {p: i for i, p in enumerate(order)}
    rows.sort(key=lambda r: position.get(r["path"], len(position)))
    write_all(output, rows, columns)
    for shard in shards:
        remove_output(shard)


def remove_output(path: Path) -> None:
    """Delete an output file with its sidecars, parts and unfinished state."""
    targets = [path, parts_dir(path), partial_path(path)]
    if suffix_of(path) == ".npy":
        targets += list(path.parent.glob(f"{path.stem}.*.npy")) + [sidecar(path, "paths.txt")]
    for target in targets:
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


class ErrorsWriter(CsvWriter):
    """`path,reason` rows for the images that failed, on disk after every write() (the same partial-then-publish
    rule as the outputs)."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path, ["path", "reason"], chunk_size=1)

    @property
    def count(self) -> int:
        return self.rows_written

    def write(self, errors: Iterable[tuple[str, str]]) -> None:
        """Append (path, reason) pairs."""
        self._buffer.extend({"path": path, "reason": reason} for path, reason in errors)
        self.flush()

    def abandon(self) -> None:
        """A failed run still publishes the failures it saw: the errors file is rewritten by every run."""
        self.close()


def read_errors(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The (path, reason) rows of an errors file."""
    with open(path, encoding="utf-8", newline="") as fh:
        return [(r["path"], r["reason"]) for r in csv.DictReader(fh)]


def merge_errors(shards: Sequence[Path], target: Path, order: Sequence[str]) -> None:
    """Merge per-rank errors files into one, in input order, and delete the shards."""
    position = {p: i for i, p in enumerate(order)}
    rows = [row for shard in shards if shard.exists() for row in read_errors(shard)]
    rows.sort(key=lambda row: position.get(row[0], len(position)))
    with ErrorsWriter(target) as out:
        out.write(rows)
    for shard in shards:
        remove_output(shard)
