"""`torchrun --nproc-per-node 2 -m hierax train` (gloo on CPU) gives the result of one process with the same global
batch: same data per step, averaged gradients, validation counts summed over ranks, rank-0 files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.train_support import make_shapes


def _args(data, val, out, batch: int) -> list[str]:
    return [
        "-m",
        "hierax",
        "train",
        "--data",
        str(data),
        "--val",
        str(val),
        "--network",
        "hieradet_d_tiny",
        "--model-config",
        '{"depths": [1, 1, 1, 1], "embed_dim": 16, "drop_path_rate": 0.0}',
        "--size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        str(batch),
        "--lr",
        "2e-3",
        "--mix-prob",
        "0",
        "--output-dir",
        str(out),
        "--workers",
        "0",
        "--log-every",
        "1",
        "--device",
        "cpu",
    ]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    data = make_shapes(tmp_path / "train", per_class=10, seed=4)
    val = make_shapes(tmp_path / "val", per_class=5, seed=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    single, double = tmp_path / "single", tmp_path / "double"
    subprocess.run([sys.executable, *_args(data, val, single, 8)], check=True, env=env, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*torchrun, *_args(data, val, double, 4)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("model:") == 1  # only rank 0 reports

    a = torch.load(single / "training_state.pt", weights_only=True)
    b = torch.load(double / "training_state.pt", weights_only=True)
    assert a["step"] == b["step"] == 5 and b["world_size"] == 2 and a["global_batch"] == b["global_batch"] == 8
    for key, value in a["ema"].items():
        assert torch.allclose(value, b["ema"][key], atol=1e-4, rtol=1e-4), key
    records = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (single, double)]
    train = [[r["loss"] for r in rs if r["split"] == "train"] for rs in records]
    assert train[0] == pytest.approx(train[1], abs=1e-4)
    val_a, val_b = ([r for r in rs if r["split"] == "val"][-1] for rs in records)
    assert val_a["images"] == val_b["images"] == 20
    assert val_a["top1"] == pytest.approx(val_b["top1"])
    assert val_a["val_loss"] == pytest.approx(val_b["val_loss"], abs=1e-4)
