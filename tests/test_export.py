"""Export round-trips: ONNX (dynamic batch and size), TorchScript, torch.export .pt2 and safetensors give the eager
model's outputs within 1e-4 (fp32) at 224, 256, 384 and a non-square size, with the ModelInfo inside the file."""

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import hierax
from hierax.cli import main
from hierax.errors import HieraxError
from hierax.export import export_model, load_exported, quantize_onnx, read_export_metadata, runners, write
from hierax.inference.classification import infer_batch
from hierax.models import create_model
from hierax.weights.files import ModelInfo, write_checkpoint
from tests.conftest import TINY, inat_names

SIZES = [(224, 224), (256, 256), (384, 384), (160, 288)]
FP32_TOL = 1e-4


@pytest.fixture(autouse=True)
def _quiet_deprecations():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _tiny(size=(64, 64), num_classes=5, seed=0):
    torch.manual_seed(seed)
    net = create_model("hieradet_d_tiny", num_classes, **TINY).eval()
    with torch.no_grad():  # non-zero biases, so the exported classifier must carry them
        for module in net.modules():
            if isinstance(module, torch.nn.Linear):
                module.bias.normal_(0, 0.02)
    info = ModelInfo.create("hieradet_d_tiny", {n: i for i, n in enumerate(inat_names(num_classes))}, size, config=TINY)
    return net, info


def _eager(net, x):
    with torch.inference_mode():
        emb = net.embedding(x)
        return net.classify(emb), emb


def _check_round_trip(runner, net, x):
    logits, emb = _eager(net, x)
    got_logits, got_emb = runner.forward_with_embedding(x)
    assert got_logits.dtype == torch.float32 and got_logits.shape == logits.shape
    assert (got_logits - logits).abs().max().item() <= FP32_TOL
    assert (got_emb - emb).abs().max().item() <= FP32_TOL
    assert (runner.classify(emb) - logits).abs().max().item() <= FP32_TOL


@pytest.fixture(scope="module")
def onnx_dynamic(tmp_path_factory):
    net, info = _tiny()
    path = export_model(net, info, tmp_path_factory.mktemp("onnx") / "tiny.onnx", dynamic_batch=True, dynamic_size=True)
    return net, info, path


@pytest.mark.parametrize("size", SIZES)
def test_onnx_dynamic_round_trip(onnx_dynamic, size):
    net, _, path = onnx_dynamic
    runner, _ = load_exported(path)
    _check_round_trip(runner, net, torch.randn(2, 3, *size))


def test_onnx_odd_sizes_and_batches(onnx_dynamic):
    """Sides that need window padding, and batch sizes other than the example's."""
    net, _, path = onnx_dynamic
    runner, _ = load_exported(path)
    for shape in [(1, 3, 70, 50), (3, 3, 100, 36)]:
        _check_round_trip(runner, net, torch.randn(*shape))


def test_onnx_metadata_inside_the_file(onnx_dynamic):
    import onnx

    _, info, path = onnx_dynamic
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["class_to_idx"]) == info.class_to_idx
    assert json.loads(props["rgb_stats"]) == info.rgb_stats and json.loads(props["signature"]) == info.signature
    assert props["network"] == "hieradet_d_tiny" and props["version"] == info.version
    back, options = read_export_metadata(path)
    assert back.class_names == info.class_names and back.size == (64, 64)
    assert back.config == json.loads(json.dumps(info.config))
    assert options == dict(format="onnx", dtype="float32", quantize=None, dynamic_batch=True, dynamic_size=True)
    assert list(path.parent.iterdir()) == [path], "no sidecar or temporary files"


def test_onnx_runner_drops_into_infer_batch_and_load_pretrained_model(onnx_dynamic):
    net, info, path = onnx_dynamic
    runner, back = hierax.load_pretrained_model(path)
    assert back.class_to_idx == info.class_to_idx
    x = torch.randn(3, 3, 96, 64)
    probs, emb = infer_batch(runner, x, return_embedding=True)
    ref_probs, ref_emb = infer_batch(net, x, return_embedding=True)
    assert np.abs(probs - ref_probs).max() <= FP32_TOL and np.abs(emb - ref_emb).max() <= FP32_TOL
    probs_tta, _ = infer_batch(runner, x, tta=True)
    assert np.abs(probs_tta - infer_batch(net, x, tta=True)[0]).max() <= FP32_TOL


def test_pt2_dynamic_round_trip(tmp_path):
    net, info = _tiny()
    path = export_model(net, info, tmp_path / "tiny.pt2", dynamic_batch=True, dynamic_size=True)
    runner, back = load_exported(path)
    assert back.class_to_idx == info.class_to_idx and back.rgb_stats == info.rgb_stats
    for size in SIZES:
        _check_round_trip(runner, net, torch.randn(2, 3, *size))
    with pytest.raises(HieraxError, match="multiples of 32"):
        runner(torch.randn(1, 3, 70, 64))


@pytest.mark.parametrize("size", SIZES)
def test_torchscript_round_trip(tmp_path, size):
    net, info = _tiny(size)
    path = export_model(net, info, tmp_path / "tiny.ts", dynamic_batch=True)
    runner, back = load_exported(path)
    assert back.size == size and back.class_names == info.class_names
    for batch in (1, 2):
        _check_round_trip(runner, net, torch.randn(batch, 3, *size))
    with pytest.raises(HieraxError, match="exported for"):
        runner(torch.randn(1, 3, size[0] + 32, size[1]))


def test_static_batch_is_enforced(tmp_path):
    net, info = _tiny()
    runner, _ = load_exported(export_model(net, info, tmp_path / "tiny.ts"))
    _check_round_trip(runner, net, torch.randn(1, 3, 64, 64))
    with pytest.raises(HieraxError, match="dynamic-batch"):
        runner(torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_bfloat16_export(tmp_path, fmt):
    net, info = _tiny()
    path = export_model(net, info, tmp_path / f"tiny.{'ts' if fmt == 'torchscript' else 'pt2'}", dtype="bfloat16")
    runner, _ = load_exported(path)
    x = torch.randn(1, 3, 64, 64)
    logits, _ = _eager(net, x)
    got = runner(x)
    assert got.dtype == torch.float32
    assert (got - logits).abs().max().item() <= 0.05 * logits.abs().max().item()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_safetensors_export(tmp_path, dtype):
    from safetensors import safe_open

    net, info = _tiny((96, 64))
    path = export_model(net, info, tmp_path / "tiny.safetensors", dtype=dtype)
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        assert handle.get_tensor("pos_embed").dtype == getattr(torch, dtype)
    assert json.loads(meta["class_to_idx"]) == info.class_to_idx and json.loads(meta["rgb_stats"]) == info.rgb_stats
    loaded, back = hierax.load_pretrained_model(path, inference=True, dtype=torch.float32)
    assert back.size == (96, 64) and back.class_to_idx == info.class_to_idx
    x = torch.randn(2, 3, 96, 64)
    tol = FP32_TOL if dtype == "float32" else 0.05 * _eager(net, x)[0].abs().max().item()
    assert (loaded(x) - _eager(net, x)[0]).abs().max().item() <= tol


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_int8_quantisation(tmp_path, onnx_dynamic, fmt):
    """int8 Linear layers: close logits and the same top-1 on most inputs; a smaller ONNX file."""
    net, info, fp32_onnx = onnx_dynamic
    int8 = export_model(net, info, tmp_path / f"int8.{'onnx' if fmt == 'onnx' else 'ts'}", quantize="int8")
    runner, _ = load_exported(int8)
    assert read_export_metadata(int8)[1]["quantize"] == "int8"
    x = torch.randn(1, 3, 64, 64)
    logits, _ = _eager(net, x)
    got = runner(x)
    assert 0 < (got - logits).abs().max().item() <= 0.1 * logits.abs().max().item()
    assert got.argmax(1).item() == logits.argmax(1).item()
    if fmt == "onnx":  # TorchScript packs int8 weights with per-layer overhead; ONNX stores them flat
        assert int8.stat().st_size < fp32_onnx.stat().st_size
        dynamic_int8, _ = load_exported(quantize_onnx(fp32_onnx, tmp_path / "dynamic.int8.onnx"))
        assert read_export_metadata(tmp_path / "dynamic.int8.onnx")[1]["dynamic_size"] is True
        assert (dynamic_int8(x) - got).abs().max().item() <= 1e-5


def test_int8_quantisation_drops_only_the_quantisers_notes(tmp_path, onnx_dynamic, caplog):
    """ONNX Runtime's per-tensor notes and its pre-processing advice (measured: no gain here) are not shown; its
    other warnings and everyone else's records are."""
    onnxruntime = pytest.importorskip("onnxruntime")
    _, _, fp32_onnx = onnx_dynamic
    with caplog.at_level(logging.INFO):
        quantize_onnx(fp32_onnx, tmp_path / "quiet.int8.onnx")
    assert not [r for r in caplog.records if "onnxruntime" in r.pathname], [r.getMessage() for r in caplog.records]
    ort_file = str(Path(onnxruntime.__file__).parent / "quantization" / "quantize.py")

    def record(level: int, message: str, pathname: str = ort_file) -> logging.LogRecord:
        return logging.LogRecord("root", level, pathname, 1, message, None, None)

    assert not write._drop_quantizer_notes(record(logging.WARNING, "Please consider to run pre-processing before"))
    assert not write._drop_quantizer_notes(record(logging.INFO, "Quantization parameters for tensor: x"))
    assert write._drop_quantizer_notes(record(logging.WARNING, "Failed to infer data type of tensor: x"))
    assert write._drop_quantizer_notes(record(logging.INFO, "Please consider", pathname="/src/hierax/export/write.py"))


@pytest.mark.parametrize("vnni", [False, True])
def test_int8_weight_bits_follow_the_cpu_and_are_written_into_the_file(tmp_path, onnx_dynamic, monkeypatch, vnni):
    """7-bit weights where ONNX Runtime's kernels would saturate 8-bit ones (x86 without VNNI), 8 with VNNI."""
    _, _, fp32_onnx = onnx_dynamic
    monkeypatch.setattr(write, "has_vnni", lambda: vnni)
    path = quantize_onnx(fp32_onnx, tmp_path / "auto.int8.onnx")
    assert read_export_metadata(path)[1]["int8_weight_bits"] == (8 if vnni else 7)
    with pytest.raises(HieraxError, match="7 or 8"):
        quantize_onnx(fp32_onnx, tmp_path / "six.int8.onnx", weight_bits=6)


def test_an_8_bit_int8_file_warns_on_a_cpu_without_vnni(tmp_path, onnx_dynamic, monkeypatch, caplog):
    net, _, fp32_onnx = onnx_dynamic
    seven = quantize_onnx(fp32_onnx, tmp_path / "seven.int8.onnx", weight_bits=7)
    eight = quantize_onnx(fp32_onnx, tmp_path / "eight.int8.onnx", weight_bits=8)
    x = torch.randn(2, 3, 64, 64)
    logits, _ = _eager(net, x)
    for path in (seven, eight) if write.has_vnni() else (seven,):  # 8-bit weights are exact only with VNNI
        assert (load_exported(path)[0](x) - logits).abs().max().item() <= 0.1 * logits.abs().max().item()
    monkeypatch.setattr(runners, "has_vnni", lambda: False)
    monkeypatch.setattr(runners, "is_x86", lambda: True)
    with caplog.at_level(logging.WARNING, logger="hierax.export.runners"):
        caplog.clear()  # ONNX Runtime's quantiser logs its own advice
        load_exported(seven)
        assert not [r for r in caplog.records if r.name == "hierax.export.runners"]
        load_exported(eight)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "hierax.export.runners"]
    assert "VNNI" in warning and "quantise it again" in warning


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fmt": "pt2", "quantize": "int8"}, "int8"),
        ({"fmt": "onnx", "int8_weight_bits": 8}, "int8 weight bits"),
        ({"fmt": "torchscript", "quantize": "int8", "int8_weight_bits": 8}, "int8 weight bits"),
        ({"fmt": "torchscript", "dynamic_size": True}, "TorchScript"),
        ({"fmt": "onnx", "dtype": "bfloat16"}, "float32"),
        ({"fmt": "gif"}, "unknown export format"),
    ],
)
def test_export_refuses_unsupported_combinations(tmp_path, kwargs, message):
    net, info = _tiny()
    with pytest.raises(HieraxError, match=message):
        export_model(net, info, tmp_path / "out.bin", **kwargs)
    assert not list(tmp_path.iterdir())


def test_cli_export(tmp_path, capsys):
    net, info = _tiny((64, 96))
    ckpt = write_checkpoint(tmp_path / "tiny.pt", net, info)
    out = tmp_path / "tiny.ts"
    assert main(["export", str(ckpt), "--output", str(out), "--dynamic-batch", "--size", "96"]) == 0
    assert "wrote" in capsys.readouterr().out
    runner, back = load_exported(out)
    assert back.size == (96, 96)
    _check_round_trip(runner, net, torch.randn(2, 3, 96, 96))
    assert main(["export", str(ckpt), "--output", str(tmp_path / "x.pt2"), "--quantize", "int8"]) == 1
    assert "int8" in capsys.readouterr().err


@pytest.mark.slow
def test_hieradet_d_small_onnx_round_trip(tmp_path):
    """The published architecture (random weights, 10 classes) through ONNX Runtime at 224."""
    torch.manual_seed(0)
    net = create_model("hieradet_d_small", 10).eval()
    info = ModelInfo.create("hieradet_d_small", {f"c{i}": i for i in range(10)}, 224)
    runner, _ = load_exported(export_model(net, info, tmp_path / "small.onnx"))
    _check_round_trip(runner, net, torch.randn(1, 3, 224, 224))
