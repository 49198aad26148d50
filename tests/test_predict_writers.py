"""Chunked writers: crash safety (finished chunks survive), resume after a half-written line, parts, merge."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from hierax.errors import HieraxError
from hierax.inference import writers

COLUMNS = ["path", "label_1", "prob_1"]


def rows(start, stop):
    return [{"path": f"img{i}.jpg", "label_1": "x", "prob_1": i / 10} for i in range(start, stop)]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_chunks_survive_a_crash_and_resume(tmp_path, suffix):
    out = tmp_path / f"pred{suffix}"
    writer = writers.open_writer(out, COLUMNS, chunk_size=2)
    writer.write(rows(0, 3))  # one chunk of 3 rows goes out now; the crash below loses nothing written
    assert writers.done_paths(out) == {f"img{i}.jpg" for i in range(3)}
    del writer  # a crash: no close()
    with writers.open_writer(out, COLUMNS, resume=True, chunk_size=2) as again:
        again.write(rows(3, 5))
    got = writers.read_rows(out)
    assert [r["path"] for r in got] == [f"img{i}.jpg" for i in range(5)]
    assert float(got[4]["prob_1"]) == pytest.approx(0.4)
    assert not writers.parts_dir(out).exists()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_half_written_line_is_cut_on_resume(tmp_path, suffix):
    out = tmp_path / f"pred{suffix}"
    with writers.open_writer(out, COLUMNS) as writer:
        writer.write(rows(0, 2))
    with open(out, "a") as fh:
        fh.write("img9.jpg,x,0." if suffix == ".csv" else '{"path": "img9')
    with writers.open_writer(out, COLUMNS, resume=True) as writer:
        writer.write(rows(2, 3))
    assert [r["path"] for r in writers.read_rows(out)] == ["img0.jpg", "img1.jpg", "img2.jpg"]


def test_resume_with_other_columns_refused(tmp_path):
    out = tmp_path / "pred.csv"
    with writers.open_writer(out, COLUMNS) as writer:
        writer.write(rows(0, 1))
    with pytest.raises(HieraxError, match="columns differ"):
        writers.open_writer(out, ["path", "label_1"], resume=True)


def test_npy_roundtrip_and_merge_in_order(tmp_path):
    emb_rows = [
        {"path": f"p{i}", "embedding": np.full(4, i, np.float32), "stage1": np.full(2, -i, np.float32)}
        for i in range(4)
    ]
    shard_a, shard_b, out = tmp_path / "e-rank0.npy", tmp_path / "e-rank1.npy", tmp_path / "e.npy"
    for shard, part in ((shard_a, emb_rows[0::2]), (shard_b, emb_rows[1::2])):
        with writers.open_writer(shard, ["path", "embedding", "stage1"], chunk_size=1) as writer:
            writer.write(part)
    writers.merge_outputs(
        [shard_a, shard_b], out, ["path", "embedding", "stage1"], ["p0", "p1", "p2", "p3"], resume=False
    )
    np.testing.assert_array_equal(np.load(out)[:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(np.load(tmp_path / "e.stage1.npy")[:, 0], [0, -1, -2, -3])
    assert writers.done_paths(out) == {"p0", "p1", "p2", "p3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "e.paths.txt", "e.stage1.npy"]
    with pytest.raises(HieraxError, match="unsupported output format"):
        writers.open_writer(tmp_path / "x.txt", COLUMNS)


def test_errors_writer(tmp_path):
    with writers.ErrorsWriter(tmp_path / "err.csv") as errs:
        errs.write([("a, b.jpg", "truncated image"), ("c.png", 'bad "quote"')])
    assert writers.read_errors(tmp_path / "err.csv") == [("a, b.jpg", "truncated image"), ("c.png", 'bad "quote"')]


def test_time_based_flush(tmp_path, monkeypatch):
    out = tmp_path / "pred.csv"
    writer = writers.open_writer(out, COLUMNS, chunk_size=1000)
    writer.write(rows(0, 1))
    assert writers.done_paths(out) == set()
    monkeypatch.setattr(writers.RowWriter, "FLUSH_SECONDS", 0.0)
    writer.write(rows(1, 2))
    assert writers.done_paths(out) == {"img0.jpg", "img1.jpg"}
    writer.close()


def _paths(rows_):
    return [r["path"] for r in rows_]


def _state(out):
    """The unfinished state of an output: its .partial file or its .parts folder."""
    return writers.partial_path(out) if out.suffix in (".csv", ".jsonl") else writers.parts_dir(out)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_the_final_name_only_ever_holds_a_complete_output(tmp_path, suffix):
    out = tmp_path / f"pred{suffix}"
    writer = writers.open_writer(out, COLUMNS, chunk_size=1)
    writer.write(rows(0, 2))
    assert not out.exists() and _state(out).exists()  # finished chunks are on disk, beside the final name
    writer.close()
    assert _paths(writers.read_rows(out)) == ["img0.jpg", "img1.jpg"] and not _state(out).exists()
    with pytest.raises(KeyboardInterrupt), writers.open_writer(out, COLUMNS, resume=True, chunk_size=1) as again:
        again.write(rows(2, 4))
        raise KeyboardInterrupt
    assert _paths(writers.read_rows(out)) == ["img0.jpg", "img1.jpg"]  # the last complete version stays
    assert writers.done_paths(out) == {f"img{i}.jpg" for i in range(4)}
    with writers.open_writer(out, COLUMNS, resume=True, chunk_size=1) as last:
        last.write(rows(4, 5))
    assert _paths(writers.read_rows(out)) == [f"img{i}.jpg" for i in range(5)] and not _state(out).exists()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_resume_continues_a_failed_fresh_run_not_the_older_output(tmp_path, suffix):
    out = tmp_path / f"pred{suffix}"
    with writers.open_writer(out, COLUMNS) as old:
        old.write(rows(0, 3))
    with pytest.raises(RuntimeError), writers.open_writer(out, COLUMNS, chunk_size=1) as fresh:
        fresh.write(rows(10, 12))
        raise RuntimeError("killed")
    assert writers.done_paths(out) == {"img10.jpg", "img11.jpg"}
    with writers.open_writer(out, COLUMNS, resume=True) as resumed:
        resumed.write(rows(12, 13))
    assert _paths(writers.read_rows(out)) == ["img10.jpg", "img11.jpg", "img12.jpg"]


def test_errors_file_is_published_even_when_the_run_fails(tmp_path):
    with pytest.raises(RuntimeError), writers.ErrorsWriter(tmp_path / "err.csv") as errs:
        errs.write([("a.jpg", "truncated image")])
        raise RuntimeError("killed")
    assert writers.read_errors(tmp_path / "err.csv") == [("a.jpg", "truncated image")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["err.csv"]


def test_csv_and_jsonl_jobs_leave_pyarrow_unloaded(tmp_path):
    """pyarrow (about 28 MiB of memory) is imported by the first Parquet file only."""
    script = (
        "import sys\n"
        "from hierax.inference import predict, writers\n"
        "for suffix in ('.csv', '.jsonl'):\n"
        f"    out = {str(tmp_path)!r} + '/pred' + suffix\n"
        "    with writers.open_writer(out, ['path', 'prob_1'], chunk_size=1) as w:\n"
        "        w.write([{'path': 'a.jpg', 'prob_1': 0.5}, {'path': 'b.jpg', 'prob_1': 0.25}])\n"
        "    assert [r['path'] for r in writers.read_rows(out)] == ['a.jpg', 'b.jpg']\n"
        "print('pyarrow' in sys.modules)\n"
        f"writers.write_all({str(tmp_path)!r} + '/pred.parquet', [{{'path': 'a.jpg'}}], ['path'])\n"
        "print('pyarrow' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"]
