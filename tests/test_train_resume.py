"""Exact resume: `hierax train` killed with SIGKILL mid-epoch and resumed ends with the same weights as an
uninterrupted run; the kill leaves the last good checkpoints readable; an old run is never overwritten silently."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hierax.cli import main
from hierax.weights.load import load_pretrained_model
from tests.train_support import make_shapes

STEPS_PER_EPOCH = 5
EPOCHS = 2


def _command(data, out, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "hierax",
        "train",
        "--data",
        str(data),
        "--network",
        "hieradet_d_tiny",
        "--model-config",
        '{"depths": [1, 1, 1, 1], "embed_dim": 16, "drop_path_rate": 0.1}',
        "--size",
        "32",
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        "8",
        "--lr",
        "2e-3",
        "--mix-prob",
        "0.5",
        "--output-dir",
        str(out),
        "--checkpoint-every",
        "2",
        "--log-every",
        "1",
        "--device",
        "cpu",
        *extra,
    ]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _saved_step(path) -> int | None:
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return None


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    data = make_shapes(tmp_path / "data", per_class=10, seed=2)
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_command(data, full, "--workers", "0"), check=True, env=_env(), capture_output=True)

    proc = subprocess.Popen(
        _command(data, killed, "--workers", "1"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state_path, step, deadline = killed / "training_state.pt", None, time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        step = _saved_step(state_path)
        if step is not None and step >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    step = _saved_step(state_path)
    assert step is not None and step < STEPS_PER_EPOCH * EPOCHS
    # the kill left the last good files: both load
    if (killed / "model.pt").exists():
        load_pretrained_model(killed / "model.pt")

    subprocess.run(_command(data, killed, "--workers", "0", "--resume"), check=True, env=_env(), capture_output=True)
    a = torch.load(full / "training_state.pt", weights_only=True)
    b = torch.load(killed / "training_state.pt", weights_only=True)
    assert a["step"] == b["step"] == STEPS_PER_EPOCH * EPOCHS
    for part in ("model", "ema"):
        for key, value in a[part].items():
            assert torch.allclose(value, b[part][key], atol=1e-6, rtol=0), (part, key)
    model_a = torch.load(full / "model.pt", weights_only=True)["state"]
    model_b = torch.load(killed / "model.pt", weights_only=True)["state"]
    assert all(torch.allclose(model_a[k], model_b[k], atol=1e-6, rtol=0) for k in model_a)
    losses = [
        [
            (r["step"], r["loss"])
            for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"
        ]
        for d in (full, killed)
    ]
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]] == list(range(1, 11))
    assert [loss for _, loss in losses[0]] == pytest.approx([loss for _, loss in losses[1]], abs=1e-5)


def test_an_existing_run_needs_resume(tmp_path, capsys):
    data = make_shapes(tmp_path / "data", per_class=2, seed=3)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "training_state.pt").write_bytes(b"not a state")
    args = _command(data, tmp_path / "out", "--workers", "0")[3:]
    assert main(args) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 1
    assert "cannot read the training state" in capsys.readouterr().err
