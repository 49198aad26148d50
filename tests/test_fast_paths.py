"""Every fast path gives the plain path's outputs: matmul attention vs the fused kernel, the cached position
embedding vs recomputing it, channels-last inputs, bf16 (weights or autocast) and torch.compile, the whole
network with oneDNN Linear (the layer itself: test_fast_paths_linear). The switch (set_fast_path, fast_path,
HIERAX_FAST_PATH) chooses the paths; to_plain gives plain modules for torch's quantiser.

Tolerances: fp32 paths 1e-5 absolute on logits of magnitude ~1; bf16 paths 5% of the largest logit."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hierax.models import create_model, fastpath
from hierax.models.fastpath import Linear, Mlp, fast_path
from tests.conftest import TINY
from tests.fastpath_support import BF16_REL_TOL, FP32_TOL, tiny_net, took_onednn


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(
    "shape",
    [
        (36, 1, 64, 64),  # stage-1 windows
        (9, 2, 16, 64),  # pooled queries against a previous-stage window
        (2, 4, 144, 144),  # global attention
    ],
)
def test_matmul_attention_matches_fused_kernel(shape, dtype, tol):
    b, heads, queries, keys = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, heads, queries, 32, generator=g).to(dtype)
    k = torch.randn(b, heads, keys, 32, generator=g).to(dtype)
    v = torch.randn(b, heads, keys, 32, generator=g).to(dtype)
    got = fastpath.attention(q, k, v)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert got.dtype == dtype
    assert (got.float() - want).abs().max().item() <= tol


@pytest.mark.parametrize("network", ["hieradet_d_tiny", "hieradet_tiny"])
@pytest.mark.parametrize("autocast", [False, True])
def test_model_attention_paths_agree(network, autocast):
    """The whole network, windowed and global blocks, with the matmul form and with the fused kernel."""
    net = tiny_net(network)
    x = torch.randn(2, 3, 96, 80)
    outs = {}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for matmul in (True, False):
            with fast_path(matmul_attention=matmul):
                outs[matmul] = net(x).float()
    tol = BF16_REL_TOL * outs[False].abs().max().item() if autocast else FP32_TOL
    assert (outs[True] - outs[False]).abs().max().item() <= tol


def test_attention_policy():
    q = torch.zeros(1, 1, 4, 8)
    assert not fastpath.use_matmul_attention(q, q), "fp32 on CPU: the fused kernel"
    native = torch.bfloat16 in fastpath.native_half_dtypes()
    assert fastpath.use_matmul_attention(q.bfloat16(), q.bfloat16()) == native, "bf16: two matmuls if native"
    with fast_path(False):
        assert not fastpath.use_matmul_attention(q.bfloat16(), q.bfloat16()), "off: the fused kernel"
    with fast_path(matmul_attention=True):
        assert fastpath.use_matmul_attention(q, q), "forced"


@pytest.mark.parametrize("amx", [False, True])
def test_with_amx_or_autograd_long_sequences_take_the_fused_kernel(monkeypatch, amx):
    """With AMX tiles the fused kernel is faster in bf16 past the smallest windows (benchmarks/README.md); without,
    every bf16 shape of the model takes two matmuls where bf16 is native, except in training: past 16 tokens two
    matmuls would raise a step's peak memory above the fused kernel's."""
    monkeypatch.setattr(fastpath, "has_amx", lambda: amx)
    monkeypatch.setattr(fastpath, "native_half_dtypes", lambda: frozenset({torch.bfloat16}))
    with fast_path():
        window = torch.zeros(144, 1, 64, 8, dtype=torch.bfloat16)  # stage 1 at 384 px: 8x8 windows
        global_ = torch.zeros(1, 4, 576, 8, dtype=torch.bfloat16)  # stage 3 at 384 px: global attention
        assert fastpath.use_matmul_attention(window, window)
        assert fastpath.use_matmul_attention(global_, global_) is not amx
        assert not fastpath.use_matmul_attention(global_.float(), global_.float())
        stage2 = torch.zeros(576, 2, 16, 8, dtype=torch.bfloat16, requires_grad=True)  # 4x4 windows
        window, global_ = window.requires_grad_(), global_.requires_grad_()
        assert fastpath.use_matmul_attention(stage2, stage2), "training: 16-token windows take two matmuls"
        assert not fastpath.use_matmul_attention(window, window) and not fastpath.use_matmul_attention(global_, global_)


def test_position_embedding_cache_matches_and_follows_weights():
    net = tiny_net()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        plain = net._compute_position_embedding(16, 24)
        cached = net.position_embedding(16, 24)
        assert torch.equal(cached, plain)
        assert net.position_embedding(16, 24) is cached, "second call is served from the cache"
        before = net(x)
        state = net.state_dict()
        state["pos_embed"] = state["pos_embed"] + 0.5 * torch.randn_like(state["pos_embed"])
        net.load_state_dict(state)
        assert torch.equal(net.position_embedding(16, 24), net._compute_position_embedding(16, 24))
        after = net(x)
    assert not torch.allclose(before, after)
    fresh = tiny_net()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(after, fresh(x))


def test_position_embedding_not_cached_when_training_or_with_grad():
    net = tiny_net()
    net(torch.randn(1, 3, 64, 64)).sum().backward()
    assert net.pos_embed.grad is not None and net.pos_embed.grad.abs().sum() > 0
    assert not net._pos_cache
    net.train()
    with torch.no_grad():
        net(torch.randn(1, 3, 64, 64))
    assert not net._pos_cache


def test_cache_stays_small():
    net = tiny_net()
    with torch.no_grad():
        for side in range(64, 64 + 4 * 12, 4):
            net.position_embedding(side // 4, side // 4)
    assert len(net._pos_cache) <= 8


def test_channels_last_input_gives_the_same_outputs():
    net = tiny_net()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert (net(x.contiguous(memory_format=torch.channels_last)) - net(x)).abs().max().item() <= FP32_TOL


def test_bfloat16_weights_and_autocast_track_fp32():
    net = tiny_net()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = net(x).float()
        weights = create_model("hieradet_d_tiny", 7, **TINY).eval()
        weights.load_state_dict(net.state_dict())
        bf16 = weights.to(torch.bfloat16)(x.bfloat16()).float()
    scale = ref.abs().max().item()
    assert (autocast - ref).abs().max().item() <= BF16_REL_TOL * scale
    assert (bf16 - ref).abs().max().item() <= BF16_REL_TOL * scale


@pytest.mark.parametrize("amx", [None, False, True])
def test_torch_compile_captures_one_graph(monkeypatch, amx):
    """torch.compile captures the network whole (fullgraph: no CPU probe inside it, the position embedding
    recomputed in the graph, not cached), in fp32 and in bf16, where attention is chosen by the AMX policy
    (None: this CPU's own probe). The aot_eager backend keeps this fast on CPU; inductor's kernels are
    PyTorch's to test."""
    if amx is not None:
        monkeypatch.setattr(fastpath, "has_amx", lambda: amx)
    monkeypatch.setattr(fastpath, "native_half_dtypes", lambda: frozenset({torch.bfloat16}))
    net = tiny_net()
    x = torch.randn(2, 3, 64, 64)
    with fast_path(), torch.no_grad():
        ref = net(x)
        compiled = torch.compile(net, backend="aot_eager", dynamic=False, fullgraph=True)
        assert (compiled(x) - ref).abs().max().item() <= FP32_TOL
        assert (compiled(x[:1]) - ref[:1]).abs().max().item() <= FP32_TOL
        half = torch.compile(net.bfloat16(), backend="aot_eager", dynamic=False, fullgraph=True)
        assert (half(x.bfloat16()).float() - ref).abs().max().item() <= BF16_REL_TOL * ref.abs().max().item()


def test_fast_path_off_takes_every_plain_path():
    net = tiny_net()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        fast = net(x)
        net._pos_cache.clear()
        with fast_path(False):
            assert not fastpath.fast_path_enabled() and fastpath.linear_dtypes() == frozenset()
            plain, onednn = took_onednn(lambda: net(x))
            assert not net._pos_cache, "the position embedding is recomputed"
        assert fastpath.fast_path_enabled(), "the previous setting is back after the block"
        assert fastpath.linear_dtypes() == fastpath.onednn_linear_dtypes()
    assert not onednn
    assert (fast - plain).abs().max().item() <= FP32_TOL
    with pytest.raises(ValueError, match="leave them unset"):
        fastpath.set_fast_path(False, linear_dtypes={torch.float32})


def test_set_fast_path_holds_until_set_again():
    layer = Linear(16, 8).eval()
    x = torch.randn(4, 16)
    try:
        fastpath.set_fast_path(False)
        with torch.no_grad():
            assert layer.onednn_dtype(x) is None
            with fast_path(linear_dtypes={torch.float32}):
                assert layer.onednn_dtype(x) == torch.float32
            assert layer.onednn_dtype(x) is None, "the context manager restores the process-wide setting"
    finally:
        fastpath.set_fast_path(True)
    assert fastpath.linear_dtypes() == fastpath.onednn_linear_dtypes()


@pytest.mark.parametrize("value, enabled", [("0", False), ("off", False), ("1", True)])
def test_environment_variable_and_lazy_probe(value, enabled):
    """HIERAX_FAST_PATH is read, and the CPU probed, when a model is first built: not on import."""
    code = (
        "import torch; from hierax.models import create_model, fastpath\n"
        "assert fastpath.onednn_linear_dtypes.cache_info().currsize == 0, 'probed on import'\n"
        "net = create_model('hieradet_d_tiny', 2, depths=(1, 1, 1, 1), embed_dim=16).eval()\n"
        "with torch.no_grad(): net(torch.randn(1, 3, 32, 32))\n"
        "print(fastpath.fast_path_enabled(), fastpath.linear_dtypes() == fastpath.onednn_linear_dtypes())\n"
    )
    env = {**os.environ, fastpath.ENV_VAR: value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    expected_dtypes = enabled or not fastpath.onednn_linear_dtypes()
    assert out.split() == [str(enabled), str(expected_dtypes)]


def _count(module: torch.nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in module.modules())


def test_to_plain_keeps_state_and_outputs():
    net = tiny_net("hieradet_tiny")
    plain = fastpath.to_plain(copy.deepcopy(net))
    assert not any(isinstance(m, (Linear, Mlp)) for m in plain.modules())
    assert _count(plain, torch.nn.Linear) == sum(isinstance(m, torch.nn.Linear) for m in net.modules())
    want, got = net.state_dict(), plain.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    x = torch.randn(2, 3, 64, 80)
    with torch.inference_mode():
        with fast_path(False):
            assert torch.equal(plain(x), net(x)), "the plain modules compute what the plain path does"
        assert (plain(x) - net(x)).abs().max().item() <= FP32_TOL
    layer = Linear(8, 4, bias=False).eval()
    root = fastpath.to_plain(layer)
    assert type(root) is torch.nn.Linear and root.weight is layer.weight and root.bias is None and not root.training


def test_to_plain_lets_torch_quantise_the_block_linears():
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import quantize_dynamic

    net = tiny_net()
    blocks = sum(isinstance(m, torch.nn.Linear) for m in net.body.modules())
    untouched = quantize_dynamic(copy.deepcopy(net).body, {torch.nn.Linear}, dtype=torch.qint8)
    assert _count(untouched, DynamicInt8Linear) == 0, "torch's quantiser matches exact types: it skips Linear"
    quantized = fastpath.to_plain(copy.deepcopy(net))
    quantized.body = quantize_dynamic(quantized.body, {torch.nn.Linear}, dtype=torch.qint8)
    assert blocks > 0 and _count(quantized.body, DynamicInt8Linear) == blocks
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        want, got = net(x), quantized(x)
    assert (got - want).abs().max().item() <= BF16_REL_TOL * want.abs().max().item()
