"""oneDNN's Linear (the fast path's fp32 and bf16 matmuls) gives ATen's outputs: fp32, bf16 weights and autocast
with its cast kept only for unchanged weights, the fused GELU and MLP, inference only, and only on CPUs whose
instruction set makes it the faster path. Tolerances as in test_fast_paths."""

import pickle
import platform

import pytest
import torch
import torch.nn.functional as F

from hierax.models import fastpath
from hierax.models.fastpath import _CAST_WEIGHTS, Linear, Mlp, fast_path
from tests.fastpath_support import BF16_REL_TOL, FP32_TOL, ONEDNN_OPS, needs_native_bf16, tiny_net, took_onednn


@pytest.fixture
def onednn_fp32():
    """The oneDNN fp32 path, also on CPUs where ATen's BLAS is the faster default (AVX2-only x86)."""
    if not ONEDNN_OPS:
        pytest.skip("no oneDNN linear ops in this torch build")
    with fast_path(linear_dtypes=fastpath.onednn_linear_dtypes() | {torch.float32}):
        yield


def test_onednn_linear_matches_aten(onednn_fp32):
    layer = Linear(48, 96).eval()
    x = torch.randn(2, 5, 7, 48)
    with torch.no_grad(), torch.profiler.profile() as prof:
        fast = layer(x)
    assert any("linear_pointwise" in event.name for event in prof.events()), "the oneDNN path was taken"
    plain = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert (fast - plain).abs().max().item() <= FP32_TOL


def _weight_packs(fn) -> tuple[torch.Tensor, int]:
    """fn's output and how many weights it packed into oneDNN's layout (a kept cast is packed once)."""
    with torch.profiler.profile() as prof:
        out = fn()
    return out, sum("reorder_linear_weight" in event.name for event in prof.events())


@needs_native_bf16
@pytest.mark.parametrize("gelu", [False, True])
def test_onednn_linear_in_bf16_weights_and_autocast(gelu):
    torch.manual_seed(0)
    layer = Linear(48, 96).eval()
    x = torch.randn(3, 10, 48)
    want = F.linear(x, layer.weight, layer.bias)
    want = F.gelu(want) if gelu else want
    tol = BF16_REL_TOL * want.abs().max().item()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast, fast = took_onednn(lambda: layer(x, gelu=gelu))
        assert fast and autocast.dtype == torch.bfloat16
        assert (autocast.float() - want).abs().max().item() <= tol
        layer.to(torch.bfloat16)
        weights, fast = took_onednn(lambda: layer(x.bfloat16(), gelu=gelu))
        assert fast and weights.dtype == torch.bfloat16
        assert (weights.float() - want).abs().max().item() <= tol


@needs_native_bf16
def test_autocast_keeps_the_cast_of_unchanged_weights_only():
    layer = Linear(16, 8).eval()
    x = torch.randn(4, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert _weight_packs(lambda: layer(x))[1] == 0, "the first call casts the weight for itself"
        assert _weight_packs(lambda: layer(x))[1] == 1, "the second finds it unchanged: packs and keeps the cast"
        assert _weight_packs(lambda: layer(x))[1] == 0, "the third reuses the kept cast"
        for _ in range(3):  # changed before every call, as a DINOv2 teacher's EMA update does: never kept
            layer.weight.lerp_(torch.randn(8, 16), 0.5)
            assert _weight_packs(lambda: layer(x))[1] == 0
        assert _CAST_WEIGHTS[layer][torch.bfloat16][1] is None, "no cast of changing weights is held"
        layer.load_state_dict({"weight": torch.randn(8, 16), "bias": torch.randn(8)})
        got = [_weight_packs(lambda: layer(x))[0].float() for _ in range(3)]
    want = F.linear(x, layer.weight, layer.bias)
    assert all((g - want).abs().max().item() <= BF16_REL_TOL * want.abs().max().item() for g in got), "new weights"
    assert torch.allclose(got[0], got[2], atol=1e-2), "the kept, packed cast computes what the per-call cast does"
    got = got[0]
    assert set(layer.state_dict()) == {"weight", "bias"}
    copy = pickle.loads(pickle.dumps(layer))  # no oneDNN tensor travels with the module
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(copy(x).float(), got)


def test_onednn_path_is_for_inference_only(onednn_fp32):
    layer = Linear(16, 8)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert layer.onednn_dtype(x) is None, "training mode"
        layer.eval()
        assert layer.onednn_dtype(x) == torch.float32
        assert layer.onednn_dtype(x.double()) is None
    assert layer.onednn_dtype(x) is None, "autograd"
    with torch.inference_mode():
        frozen = Linear(16, 8).eval()  # inference-tensor weights: no version counter
        assert frozen.onednn_dtype(x) == torch.float32, "used as they are"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert frozen.onednn_dtype(x) is None, "no cast can be kept for them"


def test_fused_mlp_matches_the_sequential_one(onednn_fp32):
    torch.manual_seed(0)
    mlp = Mlp(32, 128).eval()
    x = torch.randn(2, 5, 5, 32)
    with torch.no_grad():
        fused, fast = took_onednn(lambda: mlp(x))
        with fast_path(False):
            plain = mlp(x)
    assert fast
    assert (fused - plain).abs().max().item() <= FP32_TOL
    assert list(mlp.state_dict()) == ["0.weight", "0.bias", "3.weight", "3.bias"]


def test_onednn_linear_path_agrees_with_autograd_path(onednn_fp32):
    """The whole network: no-grad inference (oneDNN Linear) against the ATen path."""
    net = tiny_net()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        fast = net(x)
        with fast_path(linear_dtypes=()):
            plain = net(x)
    assert (fast - plain).abs().max().item() <= FP32_TOL


@fast_path(linear_dtypes={torch.float32})
def test_bf16_never_reaches_onednn_without_native_kernels():
    """On CPUs without native bf16 (AVX2-only x86) oneDNN refuses bf16 weights: autocast and bf16 weights must
    take ATen's path there, and still give fp32's answer."""
    torch.manual_seed(0)
    layer = Linear(48, 96).eval()
    x = torch.randn(3, 10, 48)
    want = F.gelu(F.linear(x, layer.weight, layer.bias))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer.onednn_dtype(x) is None
            autocast, fast = took_onednn(lambda: layer(x, gelu=True))
        assert not fast and autocast.dtype == torch.bfloat16
        layer.to(torch.bfloat16)
        assert layer.onednn_dtype(x.bfloat16()) is None
        weights, fast = took_onednn(lambda: layer(x.bfloat16(), gelu=True))
        assert not fast
    for got in (autocast, weights):
        assert (got.float() - want).abs().max().item() <= BF16_REL_TOL * want.abs().max().item()


def test_linear_backend_follows_the_instruction_set():
    """fp32 goes to oneDNN only with AVX-512 (on AVX2 MKL is faster); bf16 only where oneDNN has native kernels."""
    dtypes = fastpath.onednn_linear_dtypes()
    if not ONEDNN_OPS or platform.machine().lower() not in ("x86_64", "amd64"):
        assert dtypes == frozenset()
        return
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert (torch.float32 in dtypes) == avx512
    assert (torch.bfloat16 in dtypes) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
