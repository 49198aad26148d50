"""`torchrun --nproc-per-node 2 -m hierax pretrain` (gloo on CPU) gives the result of one process with the same
global batch: the same crops and masks per step, Sinkhorn-Knopp sums over both ranks, averaged gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.pretrain_images import make_unlabelled


def _args(data, out, batch: int) -> list[str]:
    # KoLeo is off: its nearest neighbours are searched within each rank's batch (as in DINOv2), not globally
    return [
        "-m",
        "hierax",
        "pretrain",
        "--data",
        str(data),
        "--network",
        "hieradet_d_tiny",
        "--model-config",
        '{"depths": [1, 1, 1, 1], "embed_dim": 16, "drop_path_rate": 0.0}',
        "--size",
        "64",
        "--local-size",
        "32",
        "--local-crops",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        str(batch),
        "--prototypes",
        "64",
        "--head-hidden",
        "32",
        "--head-bottleneck",
        "16",
        "--koleo",
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
    data = make_unlabelled(tmp_path / "images", photo_crops=16, textures=16, size=64)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}
    single, double = tmp_path / "single", tmp_path / "double"
    one = subprocess.run([sys.executable, *_args(data, single, 8)], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = subprocess.run([*torchrun, *_args(data, double, 4)], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("backbone:") == 1  # only rank 0 reports

    a = torch.load(single / "training_state.pt", weights_only=True)
    b = torch.load(double / "training_state.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and b["world_size"] == 2
    for part in ("model", "ema"):
        for key, value in a[part].items():
            assert torch.allclose(value, b[part][key], atol=1e-4, rtol=1e-4), f"{part}.{key}"
    records = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (single, double)]
    for term in ("dino_loss", "ibot_loss"):
        curves = [[r[term] for r in rs if r["split"] == "train"] for rs in records]
        assert curves[0] == pytest.approx(curves[1], abs=1e-4), term
