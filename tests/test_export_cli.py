"""`hierax export` as a user runs it: an ONNX export prints its one useful line, not the exporter's pass-by-pass
notes (subprocess, with the command's own logging set-up), and `--size` takes the one size syntax."""

import os
import subprocess
import sys

import pytest
import torch

from hierax.cli import main
from hierax.export import load_exported, read_export_metadata
from hierax.models import create_model
from hierax.weights.files import ModelInfo, write_checkpoint
from tests.conftest import TINY, inat_names


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    net = create_model("hieradet_d_tiny", 3, **TINY).eval()
    info = ModelInfo.create("hieradet_d_tiny", {n: i for i, n in enumerate(inat_names(3))}, 64, config=TINY)
    return write_checkpoint(tmp_path / "tiny.pt", net, info), net


def export_in_a_subprocess(tmp_path, *args: str) -> list[str]:
    """`python -m hierax export ARGS` with the command's own logging set-up: the lines it printed."""
    env = {**os.environ, "HIERAX_HOME": str(tmp_path / "home")}
    result = subprocess.run(
        [sys.executable, "-m", "hierax", "export", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return (result.stdout + result.stderr).strip().splitlines()


def test_onnx_export_prints_a_few_lines(tmp_path, checkpoint):
    ckpt, net = checkpoint
    out = tmp_path / "tiny.onnx"
    lines = export_in_a_subprocess(tmp_path, str(ckpt), "-o", str(out), "--size", "64x96")
    assert len(lines) <= 3, "\n".join(lines[:20])
    assert any(line.startswith(f"wrote {out} (onnx, float32") for line in lines)
    info, _ = read_export_metadata(out)
    assert info.size == (64, 96)
    runner, _ = load_exported(out)
    x = torch.randn(1, 3, 64, 96)
    assert (runner(x) - net(x)).abs().max().item() < 1e-4


def test_int8_export_drops_the_quantisers_per_tensor_notes(tmp_path, checkpoint):
    ckpt, _ = checkpoint
    out = tmp_path / "tiny-int8.onnx"
    lines = export_in_a_subprocess(tmp_path, str(ckpt), "-o", str(out), "--quantize", "int8")
    assert not any("Quantization parameters for tensor" in line for line in lines)
    assert len(lines) <= 4, "\n".join(lines[:20])
    assert read_export_metadata(out)[1]["quantize"] == "int8"


def test_size_syntax_and_checks(tmp_path, checkpoint, capsys):
    ckpt, _ = checkpoint
    assert main(["export", str(ckpt), "-o", str(tmp_path / "a.ts"), "--size", "64", "96"]) == 0
    assert read_export_metadata(tmp_path / "a.ts")[0].size == (64, 96)
    capsys.readouterr()
    assert main(["export", str(ckpt), "-o", str(tmp_path / "b.ts"), "--size", "0"]) == 1
    assert "--size sides must be between" in capsys.readouterr().err
    assert main(["export", str(ckpt), "-o", str(tmp_path / "c.bin")]) == 1
    assert "cannot tell the export format" in capsys.readouterr().err
    assert not (tmp_path / "b.ts").exists() and not (tmp_path / "c.bin").exists()
