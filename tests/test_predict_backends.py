"""`hierax predict --backend`: ONNX Runtime and TorchScript give the torch backend's predictions."""

import logging
import time

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from hierax.cli import main
from hierax.errors import HieraxError
from hierax.inference.predict import predict
from hierax.models import create_model
from hierax.weights.files import ModelInfo, write_checkpoint
from hierax.weights.load import load_with_backend
from tests.conftest import TINY, inat_names


@pytest.fixture
def setup(tmp_path, hierax_home):
    torch.manual_seed(0)
    net = create_model("hieradet_d_tiny", 4, **TINY)
    info = ModelInfo.create("hieradet_d_tiny", {n: i for i, n in enumerate(inat_names(4))}, 64, config=TINY)
    ckpt = write_checkpoint(tmp_path / "tiny.pt", net, info)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea", "coffee", "astronaut"):
        Image.fromarray(getattr(data, name)()).save(photos / f"{name}.jpg")
    return ckpt, photos


def _probs(summary):
    return np.array([[row[f"prob_{i}"] for i in range(1, 5)] for row in summary.rows])


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_backends_match_torch(setup, hierax_home, backend):
    ckpt, photos = setup
    base = predict([photos], ckpt, top_k=4, workers=0, progress=False)
    start = time.perf_counter()
    other = predict([photos], ckpt, top_k=4, workers=0, progress=False, backend=backend)
    wall = time.perf_counter() - start
    # The first run exports the checkpoint: that time is the model's loading, not the images'.
    assert other.load_seconds > 0 and other.seconds > 0 and other.load_seconds + other.seconds <= wall
    assert other.images_per_s == pytest.approx(3 / other.seconds) and "model loaded in" in other.line()
    assert [r["label_1"] for r in other.rows] == [r["label_1"] for r in base.rows]
    assert np.abs(_probs(other) - _probs(base)).max() < 1e-4
    exports = list((hierax_home / "exports").iterdir())
    assert len(exports) == 1
    predict([photos], ckpt, top_k=4, workers=0, progress=False, backend=backend)
    assert list((hierax_home / "exports").iterdir()) == exports


def test_backend_cli_and_mismatch(setup, tmp_path, hierax_home):
    ckpt, photos = setup
    out = tmp_path / "preds.csv"
    assert (
        main(
            [
                "predict",
                str(photos),
                "--model",
                str(ckpt),
                "--backend",
                "onnxruntime",
                "-o",
                str(out),
                "--workers",
                "0",
                "--quiet",
            ]
        )
        == 0
    )
    assert len(out.read_text().splitlines()) == 4
    runner, _ = load_with_backend(ckpt, "onnxruntime")
    onnx_file = next((hierax_home / "exports").glob("*.onnx"))
    with pytest.raises(HieraxError, match="backend torchscript runs torchscript files"):
        load_with_backend(onnx_file, "torchscript")
    with pytest.raises(HieraxError, match="backend inductor compiles checkpoints"):
        load_with_backend(onnx_file, "inductor")


def test_export_time_is_reported_apart(setup, hierax_home):
    """The first run exports (the runner says how long it took); later runs reuse the file and export nothing."""
    ckpt, _ = setup
    first, _ = load_with_backend(ckpt, "torchscript", size=(64, 64))
    assert first.export_seconds > 0
    again, info = load_with_backend(ckpt, "torchscript", size=(64, 64))
    assert again.export_seconds == 0.0 and info.size == (64, 64)


@pytest.mark.slow
def test_inductor_backend_matches_torch_with_one_graph_for_a_partial_last_batch(setup, hierax_home, caplog):
    ckpt, photos = setup
    base = predict([photos], ckpt, top_k=4, batch_size=2, workers=0, progress=False)
    with caplog.at_level(logging.INFO, logger="hierax.models.compiled"):
        compiled = predict([photos], ckpt, top_k=4, batch_size=2, workers=0, progress=False, backend="inductor")
    # 3 photos in batches of 2: the last batch of 1 is padded to 2 and runs through the same graph
    messages = [r.getMessage() for r in caplog.records if r.name == "hierax.models.compiled"]
    compiles = [m.split(" in ")[0] for m in messages if m.startswith("Compiled")]
    assert compiles == ["Compiled the model for input 2x3x64x64"]
    assert [r["label_1"] for r in compiled.rows] == [r["label_1"] for r in base.rows]
    assert np.abs(_probs(compiled) - _probs(base)).max() < 1e-4


def test_inductor_warns_where_its_fp32_gemms_are_slower_than_the_default(caplog):
    from hierax.models import compiled, fastpath

    x = torch.zeros(1, 3, 32, 32)

    def warnings(**policy) -> int:
        caplog.clear()
        with fastpath.fast_path(True, **policy), caplog.at_level(logging.WARNING, logger="hierax.models.compiled"):
            compiled._warn_if_slower_than_eager(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                compiled._warn_if_slower_than_eager(x)
            compiled._warn_if_slower_than_eager(x.bfloat16())
        return sum("slower than the default backend" in r.getMessage() for r in caplog.records)

    assert warnings(linear_dtypes={torch.float32}) == 1  # fp32 only: autocast and bf16 inputs compile well
    assert warnings(linear_dtypes=set()) == 0  # where ATen's GEMM is the default (AVX2), inductor uses it too
