"""Chunked, resumable output writers for predictions and embeddings, plus the errors file.

- `.csv` and `.jsonl` are appended to and flushed after every chunk, so a crash or Ctrl-C keeps every finished
  row; on resume a half-written last line is cut off first.
- `.parquet` and `.npy` cannot be appended to, so each chunk becomes a complete Parquet part file in
  `<output>.parts/`; `close()` merges the parts (and, on resume, the previous output) into the final file. A run
  that dies leaves its parts, and `--resume` picks them up. `.npy` holds the `embedding` column as (N, D)
  float32; its paths go to `<stem>.paths.txt` and other array columns to `<stem>.<column>.npy`.
- `done_paths(output)` lists the paths already written (output plus parts), for `--resume`.
- `ErrorsWriter` writes `path,reason` rows, flushed per row.
"""

from __future__ import annotations

import abc
import csv
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hierax.errors import HieraxError

logger = logging.getLogger(__name__)

ROW_FORMATS = (".csv", ".jsonl", ".parquet")
EMBEDDING_FORMATS = (".parquet", ".npy")
Row = dict


def _suffix(path: str | os.PathLike) -> str:
    return Path(path).suffix.lower()


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
    first (slow CPU runs lose little on a hard crash). Use as a context manager."""

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
        """Write the buffered rows to disk now."""
        if self._buffer:
            self._write_chunk(self._buffer)
            self.rows_written += len(self._buffer)
            self._buffer = []
        self._last_flush = time.monotonic()

    @abc.abstractmethod
    def _write_chunk(self, rows: list[Row]) -> None:
        """Write one chunk of rows durably."""

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CsvWriter(RowWriter):
    """Appends CSV rows with a header line; refuses to resume into a file with other columns."""

    def __init__(self, path, columns, *, resume=False, chunk_size=256):
        super().__init__(path, columns, resume=resume, chunk_size=chunk_size)
        exists = resume and self.path.exists() and self.path.stat().st_size > 0
        if exists:
            _cut_partial_line(self.path)
            with open(self.path, encoding="utf-8", newline="") as fh:
                header = next(csv.reader(fh), [])
            if header != self.columns:
                raise HieraxError(f"cannot resume {self.path}: its columns differ from this run's ({header[:4]}...)")
        self._fh = open(self.path, "a" if exists else "w", encoding="utf-8", newline="")
        self._csv = csv.DictWriter(self._fh, fieldnames=self.columns, extrasaction="ignore")
        if not exists:
            self._csv.writeheader()
            self._fh.flush()

    def _write_chunk(self, rows):
        self._csv.writerows(rows)
        self._fh.flush()

    def close(self):
        super().close()
        self._fh.close()


class JsonlWriter(RowWriter):
    """Appends one JSON object per line."""

    def __init__(self, path, columns, *, resume=False, chunk_size=256):
        super().__init__(path, columns, resume=resume, chunk_size=chunk_size)
        exists = resume and self.path.exists()
        if exists:
            _cut_partial_line(self.path)
        self._fh = open(self.path, "a" if exists else "w", encoding="utf-8")

    def _write_chunk(self, rows):
        self._fh.write("".join(json.dumps({c: _plain(r.get(c)) for c in self.columns}) + "\n" for r in rows))
        self._fh.flush()

    def close(self):
        super().close()
        self._fh.close()


def _plain(value):
    """A JSON-serialisable version of a row value (arrays become lists)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def parts_dir(path: str | os.PathLike) -> Path:
    """The folder holding the finished chunks of a .parquet / .npy output that is still being written."""
    path = Path(path)
    return path.with_name(path.name + ".parts")


def _rows_to_table(rows: list[Row], columns: Sequence[str]) -> pa.Table:
    arrays = {}
    for col in columns:
        values = [r.get(col) for r in rows]
        if values and isinstance(values[0], np.ndarray):
            flat = np.stack(values).astype(np.float32)
            arrays[col] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        else:
            arrays[col] = pa.array(values)
    return pa.table(arrays)


def _table_to_rows(table: pa.Table) -> list[Row]:
    columns = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            columns[name] = list(col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size))
        else:
            columns[name] = col.to_pylist()
    return [dict(zip(columns, values)) for values in zip(*columns.values())] if columns else []


class PartsWriter(RowWriter):
    """Writes each chunk as a Parquet part; close() merges parts (and a resumed output) into the final file."""

    def __init__(self, path, columns, *, resume=False, chunk_size=256):
        super().__init__(path, columns, resume=resume, chunk_size=chunk_size)
        self.parts = parts_dir(self.path)
        if not resume and self.parts.exists():
            shutil.rmtree(self.parts)
        self.parts.mkdir(parents=True, exist_ok=True)
        self._next = len(list(self.parts.glob("part-*.parquet")))

    def _write_chunk(self, rows):
        final = self.parts / f"part-{self._next:06d}.parquet"
        tmp = final.with_suffix(".tmp")
        pq.write_table(_rows_to_table(rows, self.columns), tmp)
        os.replace(tmp, final)
        self._next += 1

    def close(self):
        super().close()
        rows = read_rows(self.path) if self.resume and self.path.exists() else []
        for part in sorted(self.parts.glob("part-*.parquet")):
            rows.extend(_table_to_rows(pq.read_table(part)))
        write_all(self.path, rows, self.columns)
        shutil.rmtree(self.parts)


def write_all(path: str | os.PathLike, rows: list[Row], columns: Sequence[str]) -> None:
    """Write a complete output file at once (atomic rename), in the format its suffix names."""
    path = Path(path)
    suffix = _suffix(path)
    tmp = path.with_name(path.name + ".tmp")
    if suffix == ".parquet":
        pq.write_table(_rows_to_table(rows, columns), tmp)
    elif suffix == ".npy":
        _write_npy(path, rows, columns)
        return
    elif suffix in (".csv", ".jsonl"):
        writer_cls = CsvWriter if suffix == ".csv" else JsonlWriter
        with writer_cls(tmp, columns) as writer:
            writer.write(rows)
    else:
        raise HieraxError(f"unsupported output format {suffix or path.name}")
    os.replace(tmp, path)


def _sidecar(path: Path, name: str) -> Path:
    return path.with_name(f"{path.stem}.{name}")


def _write_npy(path: Path, rows: list[Row], columns: Sequence[str]) -> None:
    arrays = [c for c in columns if c != "path"]
    if "embedding" not in arrays:
        raise HieraxError(".npy output holds embeddings; use .csv, .jsonl or .parquet for predictions")
    for col in arrays:
        target = path if col == "embedding" else _sidecar(path, f"{col}.npy")
        values = [r[col] for r in rows]
        data = np.stack(values).astype(np.float32) if values else np.zeros((0, 0), dtype=np.float32)
        tmp = target.with_name(target.name + ".tmp.npy")
        np.save(tmp, data)
        os.replace(tmp, target)
    paths_file = _sidecar(path, "paths.txt")
    paths_file.with_name(paths_file.name + ".tmp").write_text("".join(f"{r['path']}\n" for r in rows), "utf-8")
    os.replace(paths_file.with_name(paths_file.name + ".tmp"), paths_file)


def read_rows(path: str | os.PathLike) -> list[Row]:
    """Every row of a finished output file (CSV values come back as strings)."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh))
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.endswith("\n")]
    if suffix == ".parquet":
        return _table_to_rows(pq.read_table(path))
    if suffix == ".npy":
        paths = _sidecar(path, "paths.txt").read_text("utf-8").splitlines()
        rows = [{"path": p} for p in paths]
        for extra in sorted(path.parent.glob(f"{path.stem}.*.npy")):
            name = extra.name[len(path.stem) + 1 : -len(".npy")]
            for row, value in zip(rows, np.load(extra), strict=True):
                row[name] = value
        for row, value in zip(rows, np.load(path), strict=True):
            row["embedding"] = value
        return rows
    raise HieraxError(f"unsupported output format {suffix or path.name}")


def done_paths(path: str | os.PathLike) -> set[str]:
    """Paths already written to `path` (and to its unfinished parts), for --resume."""
    path = Path(path)
    done: set[str] = set()
    if path.exists() and (_suffix(path) != ".npy" or _sidecar(path, "paths.txt").exists()):
        if _suffix(path) == ".npy":
            done.update(_sidecar(path, "paths.txt").read_text("utf-8").splitlines())
        elif _suffix(path) == ".parquet":
            done.update(pq.read_table(path, columns=["path"]).column("path").to_pylist())
        else:
            done.update(r["path"] for r in read_rows(path))
    if parts_dir(path).exists():
        for part in parts_dir(path).glob("part-*.parquet"):
            done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
    return done


def open_writer(
    path: str | os.PathLike, columns: Sequence[str], *, resume: bool = False, chunk_size: int = 256
) -> RowWriter:
    """The writer for the output format `path`'s suffix names (.csv, .jsonl, .parquet, .npy)."""
    suffix = _suffix(path)
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
    """Delete an output file with its sidecars and parts."""
    targets = [path, parts_dir(path)]
    if _suffix(path) == ".npy":
        targets += list(path.parent.glob(f"{path.stem}.*.npy")) + [_sidecar(path, "paths.txt")]
    for target in targets:
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


class ErrorsWriter:
    """`path,reason` rows for the images that failed, flushed as they come."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self._fh = open(self.path, "w", encoding="utf-8", newline="")
        self._csv = csv.writer(self._fh)
        self._csv.writerow(["path", "reason"])
        self._fh.flush()

    def write(self, errors: Iterable[tuple[str, str]]) -> None:
        """Append (path, reason) pairs."""
        for path, reason in errors:
            self._csv.writerow([path, reason])
            self.count += 1
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> ErrorsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_errors(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The (path, reason) rows of an errors file."""
    with open(path, encoding="utf-8", newline="") as fh:
        return [(r["path"], r["reason"]) for r in csv.DictReader(fh)]
