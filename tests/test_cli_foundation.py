"""`hierax models` and `hierax info`, run as real subprocesses."""

import json
import subprocess
import sys

from hierax.models import create_model
from hierax.weights.describe import models_table
from hierax.weights.files import ModelInfo, write_checkpoint
from tests.conftest import TINY, inat_names


def _hierax(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hierax", *args], capture_output=True, text=True, env=env, timeout=120)


def test_models_lists_networks_and_weights(hierax_home, monkeypatch):
    table = models_table()
    names = {row["name"] for row in table["weights"]}
    assert {"hieradet_small_dino-v2-inat21", "hieradet_d_small_dino-v2", "hieradet_small_sam2_1"} <= names
    small = next(r for r in table["networks"] if r["network"] == "hieradet_d_small")
    assert small["params_m"] == 33.9
    assert not any(row["cached"] for row in table["weights"])
    (hierax_home / "weights").mkdir(parents=True)
    (hierax_home / "weights" / "hieradet_d_small_dino-v2.pt").write_bytes(b"x")
    out = _hierax("models")
    assert out.returncode == 0
    line = next(ln for ln in out.stdout.splitlines() if ln.strip().startswith("hieradet_d_small_dino-v2 "))
    assert line.rstrip().endswith("yes") and "224x224" in line and "129.6 MiB" in line


def test_info_on_file(tmp_path):
    net = create_model("hieradet_d_tiny", 4, **TINY)
    info = ModelInfo.create("hieradet_d_tiny", {n: i for i, n in enumerate(inat_names(4))}, (96, 128), config=TINY)
    path = write_checkpoint(tmp_path / "tiny.safetensors", net, info)
    out = _hierax("info", str(path), "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["num_classes"] == 4 and got["input_size"] == [96, 128] and got["file_format"] == "safetensors"
    assert got["num_params"] == sum(p.numel() for p in net.parameters())
    assert got["rgb_stats"]["mean"] == [0.5191, 0.5306, 0.4877]


def test_info_errors_are_messages(tmp_path):
    out = _hierax("info", "hieradet_smal_dino")
    assert out.returncode == 1 and "Traceback" not in out.stderr and "Did you mean" in out.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage" * 10)
    out = _hierax("info", str(bad))
    assert out.returncode == 1 and "corrupt or truncated" in out.stderr


def test_info_on_exported_onnx(tmp_path):
    from hierax.export import export_model

    net = create_model("hieradet_d_tiny", 3, **TINY).eval()
    info = ModelInfo.create("hieradet_d_tiny", {n: i for i, n in enumerate(inat_names(3))}, 64, config=TINY)
    path = export_model(net, info, tmp_path / "tiny.onnx")
    out = _hierax("info", str(path), "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["file_format"] == "onnx" and got["num_classes"] == 3 and got["input_size"] == [64, 64]
    assert got["classes_sample"] == inat_names(3)
