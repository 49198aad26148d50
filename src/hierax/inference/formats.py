"""Output files as whole files: reading every row back, writing a complete file at once (atomically), and the
row formats the chunked writers append (.csv, .jsonl; Parquet tables). `.npy` holds the `embedding` column as
(N, D) float32; its paths go to `<stem>.paths.txt` and other array columns to `<stem>.<column>.npy`.
pyarrow is imported on the first Parquet file, so a CSV or JSON Lines job does not hold it in memory.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hierax.atomic import atomic_write
from hierax.errors import HieraxError

if TYPE_CHECKING:
    import pyarrow as pa

Row = dict

ROW_FORMATS = (".csv", ".jsonl", ".parquet")
EMBEDDING_FORMATS = (".parquet", ".npy")


def suffix_of(path: str | os.PathLike) -> str:
    """The lower-case suffix that names a file's format."""
    return Path(path).suffix.lower()


def check_format(path: str | os.PathLike, formats: Sequence[str] = (*ROW_FORMATS, ".npy")) -> None:
    """HieraxError unless `path`'s suffix is one of `formats`: checked before a job starts."""
    if suffix_of(path) not in formats:
        raise HieraxError(f"unsupported output format '{suffix_of(path) or Path(path).name}': use {', '.join(formats)}")


def write_csv_rows(fh, columns: Sequence[str], rows: Iterable[Row], *, header: bool = False) -> None:
    """CSV lines of `rows` (missing values empty) on an open text file, after the header line if asked."""
    writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows(rows)


def write_jsonl_rows(fh, columns: Sequence[str], rows: Iterable[Row], *, header: bool = False) -> None:
    """One JSON object per row on an open text file (JSON lines have no header)."""
    fh.write("".join(json.dumps({c: _plain(r.get(c)) for c in columns}) + "\n" for r in rows))


def _plain(value):
    """A JSON-serialisable version of a row value (arrays become lists)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def rows_to_table(rows: list[Row], columns: Sequence[str]) -> pa.Table:
    """A Parquet table of `rows`; array values become fixed-size float32 lists."""
    import pyarrow as pa

    arrays = {}
    for col in columns:
        values = [r.get(col) for r in rows]
        if values and isinstance(values[0], np.ndarray):
            flat = np.stack(values).astype(np.float32)
            arrays[col] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        else:
            arrays[col] = pa.array(values)
    return pa.table(arrays)


def table_to_rows(table: pa.Table) -> list[Row]:
    """The rows of a Parquet table; fixed-size lists come back as NumPy arrays."""
    import pyarrow as pa

    columns = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            columns[name] = list(col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size))
        else:
            columns[name] = col.to_pylist()
    return [dict(zip(columns, values)) for values in zip(*columns.values())] if columns else []


def write_parquet(path: Path, rows: list[Row], columns: Sequence[str]) -> None:
    """A Parquet file of `rows`, written atomically."""
    import pyarrow.parquet as pq

    table = rows_to_table(rows, columns)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_all(path: str | os.PathLike, rows: list[Row], columns: Sequence[str]) -> None:
    """Write a complete output file at once (atomically), in the format its suffix names."""
    path = Path(path)
    suffix = suffix_of(path)
    if suffix == ".parquet":
        write_parquet(path, rows, columns)
    elif suffix == ".npy":
        _write_npy(path, rows, columns)
    elif suffix in (".csv", ".jsonl"):
        fmt = write_csv_rows if suffix == ".csv" else write_jsonl_rows

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                fmt(fh, columns, rows, header=True)

        atomic_write(path, write)
    else:
        raise HieraxError(f"unsupported output format {suffix or path.name}")


def sidecar(path: Path, name: str) -> Path:
    """A file beside a .npy output: `<stem>.<name>`."""
    return path.with_name(f"{path.stem}.{name}")


def _write_npy(path: Path, rows: list[Row], columns: Sequence[str]) -> None:
    """The embedding array, one array per other array column, and the paths file; each written atomically."""
    arrays = [c for c in columns if c != "path"]
    if "embedding" not in arrays:
        raise HieraxError(".npy output holds embeddings; use .csv, .jsonl or .parquet for predictions")
    for col in arrays:
        target = path if col == "embedding" else sidecar(path, f"{col}.npy")
        values = [r[col] for r in rows]
        data = np.stack(values).astype(np.float32) if values else np.zeros((0, 0), dtype=np.float32)
        atomic_write(target, lambda tmp, data=data: np.save(tmp, data))
    text = "".join(f"{r['path']}\n" for r in rows)
    atomic_write(sidecar(path, "paths.txt"), lambda tmp: Path(tmp).write_text(text, "utf-8"))


def read_rows(path: str | os.PathLike) -> list[Row]:
    """Every row of a finished output file (CSV values come back as strings)."""
    path = Path(path)
    suffix = suffix_of(path)
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh))
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.endswith("\n")]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return table_to_rows(pq.read_table(path))
    if suffix == ".npy":
        paths = sidecar(path, "paths.txt").read_text("utf-8").splitlines()
        rows = [{"path": p} for p in paths]
        for extra in sorted(path.parent.glob(f"{path.stem}.*.npy")):
            name = extra.name[len(path.stem) + 1 : -len(".npy")]
            for row, value in zip(rows, np.load(extra), strict=True):
                row[name] = value
        for row, value in zip(rows, np.load(path), strict=True):
            row["embedding"] = value
        return rows
    raise HieraxError(f"unsupported output format {suffix or path.name}")


def paths_in(path: Path) -> set[str]:
    """The paths of a finished output file."""
    if suffix_of(path) == ".npy":
        paths_file = sidecar(path, "paths.txt")
        return set(paths_file.read_text("utf-8").splitlines()) if paths_file.exists() else set()
    if suffix_of(path) == ".parquet":
        import pyarrow.parquet as pq

        return set(pq.read_table(path, columns=["path"]).column("path").to_pylist())
    return {r["path"] for r in read_rows(path)}
