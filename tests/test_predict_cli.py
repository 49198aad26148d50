"""The real `hierax predict / embed / evaluate` commands in a subprocess, and torchrun with 2 CPU processes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from hierax.inference import writers
from hierax.inference.predict import predict
from tests.data_fixtures import CLASS_NAMES, make_checkpoint, make_inat_dataset, write_bad_files, write_image


def hierax(*args, cwd=None, module=("-m", "hierax")) -> subprocess.CompletedProcess:
    env = {**os.environ, "HIERAX_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *module, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    json_path = make_inat_dataset(root / "ds", per_class=2)
    bad = write_bad_files(root / "bad")
    checkpoint = make_checkpoint(root / "tiny.pt", size=64)
    return root, json_path, bad, checkpoint


def test_predict_and_embed_cli(setup, cli):
    root, json_path, bad, checkpoint = setup
    extra = write_image(root / "extra" / "one.webp", 5)
    listing = root / "list.txt"
    listing.write_text(f"{extra}\n")
    out = root / "pred.csv"
    result = hierax(
        "predict",
        root / "ds" / "val",
        root / "bad" / "*.*",
        listing,
        "--model",
        checkpoint,
        "--output",
        out,
        "--top-k",
        "2",
        "--rollup",
        "--thresholds",
        "species=0.9,genus=0.5",
        "--common-names",
        json_path,
        "--workers",
        "1",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert "8 ok" not in result.stderr and f"9 ok, {len(bad)} failed of 14 images" in result.stderr
    rows = writers.read_rows(out)
    assert len(rows) == 9 and rows[-1]["path"] == str(extra)
    assert set(rows[0]) >= {"label_2", "prob_2", "genus", "species", "common_name", "rollup_rank", "rollup_prob"}
    assert all(r["label_1"] in CLASS_NAMES for r in rows)
    assert {p for p, _ in writers.read_errors(root / "pred.errors.csv")} == set(bad)

    common = ["--model", checkpoint, "--workers", "0", "--quiet"]
    done = cli(
        "predict",
        root / "ds" / "val",
        *common,
        "--output",
        out,
        "--resume",
        "--top-k",
        "2",
        "--rollup",
        "--thresholds",
        "species=0.9,genus=0.5",
        "--common-names",
        json_path,
    )
    assert done.returncode == 0 and "8 skipped" in done.stderr, done.stderr
    done = cli("predict", extra, *common, "--species-list", listing)
    assert done.returncode == 1 and "species list" in done.stderr
    done = cli("predict", root / "bad", *common)
    assert done.returncode == 1 and f"0 ok, {len(bad)} failed" in done.stderr
    image = root / "ds" / "val" / CLASS_NAMES[0] / "0000.jpg"
    done = cli("predict", image, *common, "--top-k", "1")
    lines = done.stdout.splitlines()
    assert (
        done.returncode == 0 and lines[0].startswith("path,label_1,prob_1,kingdom") and lines[1].startswith(str(image))
    )
    done = cli("predict", image, "--model", root / "nope.pt")
    assert done.returncode == 1 and "nope.pt" in done.stderr
    done = cli("embed", root / "ds", *common, "--output", root / "emb.npy", "--features", "stage4")
    assert done.returncode == 0, done.stderr
    assert np.load(root / "emb.npy").shape == (8, 128) and np.load(root / "emb.stage4.npy").shape == (8, 128)


def test_evaluate_cli(setup):
    root, json_path, _, checkpoint = setup
    ev = hierax("evaluate", json_path, "--model", checkpoint, "--output-dir", root / "eval", "--quiet")
    assert ev.returncode == 0, ev.stderr
    assert "top-1" in ev.stdout and "per rank" in ev.stdout
    assert (root / "eval" / "report.json").exists() and (root / "eval" / "reliability.png").exists()


@pytest.mark.slow
def test_torchrun_two_cpu_processes_merge_in_input_order(setup):
    root, _, bad, checkpoint = setup
    sources = [root / "ds" / "val", *sorted(bad)]
    out = root / "ddp.parquet"
    result = hierax(
        "--nproc-per-node",
        "2",
        "-m",
        "hierax",
        "predict",
        *sources,
        "--model",
        checkpoint,
        "--output",
        out,
        "--workers",
        "0",
        "--quiet",
        module=("-m", "torch.distributed.run"),
    )
    assert result.returncode == 0, result.stderr
    assert f"8 ok, {len(bad)} failed of 13 images" in result.stderr
    single = predict([str(s) for s in sources], checkpoint, workers=0, progress=False)
    rows = writers.read_rows(out)
    assert [r["path"] for r in rows] == [r["path"] for r in single.rows]
    for got, want in zip(rows, single.rows, strict=True):
        assert got["label_1"] == want["label_1"] and got["prob_1"] == pytest.approx(want["prob_1"], abs=2e-6)
    assert [p for p, _ in writers.read_errors(root / "ddp.errors.csv")] == sorted(bad)
    assert sorted(p.name for p in root.glob("ddp*")) == ["ddp.errors.csv", "ddp.parquet"]
