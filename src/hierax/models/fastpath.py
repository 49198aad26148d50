"""CPU inference fast paths of HieraDet, and the switch that turns them off.

The model's layers come from here: `Linear` (nn.Linear that calls oneDNN directly and can fuse a GELU), `Mlp` (GELU
fused into its first layer) and `attention` (two matmuls and a softmax, or the fused kernel). Which one runs is
chosen per call from what this CPU computes natively, probed on first use and cached. `images_per_forward` says how
many images one eager CPU forward should take. Every fast path gives the plain path's outputs within rounding and
keeps the plain modules' state-dict names. oneDNN's Linear is for eager inference only (training, autograd,
tracing, export and torch.compile take ATen's); exported and traced graphs always attend with two matmuls. The
measurements behind each choice are in benchmarks/README.md.

The switch, as timm's `set_fused_attn` / `TIMM_FUSED_ATTN` (process-wide, not per thread):

    HIERAX_FAST_PATH=0                 # environment: start with the fast paths off (read when first needed)
    set_fast_path(False)               # off for the rest of the process; set_fast_path(True) restores the default
    with fast_path(False): ...         # off inside the block only
    with fast_path(linear_dtypes={torch.float32}, matmul_attention=True): ...   # force kernels (tests, benchmarks)

`to_plain(module)` turns the fast-path modules back into nn.Linear and nn.Sequential, for tools that match exact
module types (torch's dynamic quantisation).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hierax.models.configs import HieraDetConfig

ENV_VAR = "HIERAX_FAST_PATH"
_OFF_VALUES = ("0", "false", "no", "off")

# Above this many attention scores (batch * heads * queries * keys) the CPU uses the fused kernel, whose memory
# does not grow with the score matrix.
_CPU_MATMUL_ATTENTION_MAX = 1 << 26
# With AMX, the fused kernel's bf16 tile GEMMs beat two matmuls once a sequence is longer than a small window.
_AMX_MATMUL_ATTENTION_MAX_TOKENS = 64
# In training, two matmuls save time at every length, but autograd keeps contiguous copies of q, k^T, the
# probabilities and v for their backward (the heads' strided views of the qkv projection cannot be batched without
# a copy), where the fused kernel keeps the views: from 64-token windows up a step's peak memory rises above the
# fused kernel's; up to 16 tokens it falls below it.
_TRAINING_MATMUL_ATTENTION_MAX_TOKENS = 16
# glibc's malloc serves blocks up to its mmap threshold from its heap, where freed memory is reused; the threshold
# rises to the largest block freed so far but stops at 32 MiB (64-bit), and a larger block is mapped afresh at
# every call, each of its pages faulting again.
_CPU_ACTIVATION_MAX_BYTES = 32 << 20


# ---- what this CPU computes natively (probed once, on first use) ----


@functools.cache
def native_half_dtypes() -> frozenset[torch.dtype]:
    """bf16 and fp16 where this CPU computes them natively (oneDNN's own check: AVX-512, AVX-NE-CONVERT, AMX or
    Arm's BF16). Elsewhere, as on AVX2-only x86, they are emulated through fp32 at a fraction of its speed."""
    mkldnn = torch.ops.mkldnn
    checks = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
    return frozenset(dt for dt, check in checks.items() if hasattr(mkldnn, check) and getattr(mkldnn, check)())


def is_x86() -> bool:
    """Whether this is an x86-64 CPU, whose instruction sets (AVX-512, VNNI, AMX) the probes below read."""
    return platform.machine().lower() in ("x86_64", "amd64")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The kernel's CPU flags (Linux's /proc/cpuinfo); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return frozenset(next((line for line in fh if line.startswith("flags")), "").partition(":")[2].split())
    except OSError:
        return frozenset()


def has_amx() -> bool:
    """Whether this CPU has AMX tiles with bf16 (Intel Sapphire Rapids and later); False where the flags cannot be
    read."""
    return {"amx_tile", "amx_bf16"} <= cpu_flags()


def has_vnni() -> bool:
    """Whether this x86 CPU multiplies int8 with VNNI (AVX-512 VNNI, AVX-VNNI or AMX-INT8): int8 dot products
    accumulated in 32 bits. Without it the u8 x s8 instructions add pairs of products in 16 bits, which 8-bit
    weights can saturate."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


@functools.cache
def onednn_linear_dtypes() -> frozenset[torch.dtype]:
    """The dtypes in which `Linear` calls oneDNN on this CPU by default, chosen by instruction set as measured:
    fp32 with AVX-512 (on AMD CPUs ATen's BLAS, MKL, never uses AVX-512; on AVX2-only CPUs MKL is the faster one,
    so ATen's default stays); bf16 where oneDNN has native bf16 kernels (elsewhere it refuses bf16). Only on
    x86-64; elsewhere (e.g. ARM) ATen's default stays."""
    mkldnn = torch.ops.mkldnn
    if not (
        is_x86()
        and torch.backends.mkldnn.is_available()
        and all(hasattr(mkldnn, op) for op in ("_linear_pointwise", "_reorder_linear_weight"))
    ):
        return frozenset()
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return frozenset({torch.float32} if avx512 else set()) | (native_half_dtypes() & {torch.bfloat16})


# ---- the switch ----


@dataclass(frozen=True)
class _Policy:
    enabled: bool
    linear_dtypes: frozenset[torch.dtype]  # Linear calls oneDNN for inputs in these
    matmul_attention: bool | None  # forced form: True two matmuls, False the fused kernel; None: by dtype
    matmul_dtypes: frozenset[torch.dtype]  # unless forced, two matmuls on CPU for these (native half dtypes)
    amx: bool  # AMX tiles: long sequences take the fused kernel even in these


_policy: _Policy | None = None  # None until first use (a Linear built, or attention called): then HIERAX_FAST_PATH


def _make_policy(
    enabled: bool, linear_dtypes: Iterable[torch.dtype] | None = None, matmul_attention: bool | None = None
) -> _Policy:
    if not enabled:
        if linear_dtypes is not None or matmul_attention is not None:
            raise ValueError("linear_dtypes and matmul_attention choose among the fast paths: leave them unset")
        return _Policy(False, frozenset(), False, frozenset(), False)
    dtypes = onednn_linear_dtypes() if linear_dtypes is None else frozenset(linear_dtypes)
    # Every probe runs here, outside any graph torch.compile traces: a file read inside one breaks the graph.
    return _Policy(True, dtypes, matmul_attention, native_half_dtypes(), has_amx())


def _current() -> _Policy:
    global _policy
    if _policy is None:
        _policy = _make_policy(os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF_VALUES)
    return _policy


def set_fast_path(
    enabled: bool = True,
    *,
    linear_dtypes: Iterable[torch.dtype] | None = None,
    matmul_attention: bool | None = None,
) -> None:
    """Turn the CPU fast paths on (the default, chosen for this CPU) or off, for the whole process.

    Off, every layer takes the plain path: ATen's Linear, a separate GELU, the fused attention kernel and the
    position embedding recomputed on every call (exported and traced graphs keep their two-matmul attention).
    On, two options override the CPU's choice, for tests and benchmarks: `linear_dtypes`, the dtypes in which
    Linear calls oneDNN (e.g. {torch.float32} on a CPU where ATen's BLAS is the default, or () for none), and
    `matmul_attention`, True or False to force the two-matmul form or the fused kernel for every dtype and
    device. Outputs stay those of the plain path within rounding."""
    global _policy
    _policy = _make_policy(enabled, linear_dtypes, matmul_attention)


@contextlib.contextmanager
def fast_path(
    enabled: bool = True,
    *,
    linear_dtypes: Iterable[torch.dtype] | None = None,
    matmul_attention: bool | None = None,
) -> Iterator[None]:
    """`set_fast_path` for the duration of a `with` block; the previous setting is restored on exit."""
    global _policy
    saved = _current()
    _policy = _make_policy(enabled, linear_dtypes, matmul_attention)
    try:
        yield
    finally:
        _policy = saved


def fast_path_enabled() -> bool:
    """Whether the fast paths are on (`set_fast_path`, `fast_path`, HIERAX_FAST_PATH)."""
    return _current().enabled


def linear_dtypes() -> frozenset[torch.dtype]:
    """The dtypes in which `Linear` calls oneDNN now: the CPU's default, an override, or none when off."""
    return _current().linear_dtypes


# ---- attention ----


def use_matmul_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `attention` takes the two-matmul form rather than the fused kernel.

    Exported and traced graphs always do (ONNX Runtime runs it well). On CPU in bf16/fp16 with native kernels the
    CPU fused kernel is much slower than two bf16 matmuls and a softmax for this model's shapes, except with AMX,
    where it is faster past the smallest windows; where bf16 is emulated (AVX2-only x86) the fused kernel, which
    accumulates in fp32, is faster; in fp32 it is as fast or faster, and on CUDA it is the fast path. When autograd
    records, only windows of up to 16 tokens take two matmuls: longer ones would raise a training step's peak
    memory above the fused kernel's."""
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        return True
    policy = _current()
    if policy.matmul_attention is not None:
        return policy.matmul_attention
    if q.device.type != "cpu" or q.dtype not in policy.matmul_dtypes:
        return False
    if policy.amx and k.shape[2] > _AMX_MATMUL_ATTENTION_MAX_TOKENS:
        return False
    if torch.is_grad_enabled() and q.requires_grad and k.shape[2] > _TRAINING_MATMUL_ATTENTION_MAX_TOKENS:
        return False
    return q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= _CPU_MATMUL_ATTENTION_MAX


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention over (B, heads, tokens, head_dim)."""
    if use_matmul_attention(q, k):
        # Contiguous operands: oneDNN multiplies q by a transposed contiguous k about twice as fast as by the
        # strided slices of the qkv projection.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        return attn.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v)


# ---- batches ----


def images_per_forward(net: nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """How many images of `x` (B, 3, H, W) one eager forward of `net` should take on CPU: as many as keep its
    largest activation, the first stage's MLP hidden layer, in `dtype` (x's by default; bf16 under amp), within
    _CPU_ACTIVATION_MAX_BYTES. Then each call reuses the memory the last one freed instead of faulting in fresh
    pages, and peak memory stops growing with the batch. All of `x` on other devices, with the fast paths off,
    and for nets other than the eager HieraDet (exported runners and compiled graphs keep their batch shapes)."""
    config = getattr(net, "config", None)
    if x.device.type != "cpu" or not fast_path_enabled() or not isinstance(config, HieraDetConfig):
        return max(len(x), 1)
    tokens = -(-x.shape[-2] // 4) * -(-x.shape[-1] // 4)  # the stride-4 stem's grid
    per_image = tokens * int(config.embed_dim * config.mlp_ratio) * (dtype or x.dtype).itemsize
    return max(1, min(len(x), _CPU_ACTIVATION_MAX_BYTES // per_image))


# ---- Linear and MLP ----

# Per Linear layer under autocast: {dtype: ((weight pointer, version, dtype, shape), packed cast weight, bias)}.
# Kept outside the modules so that state dicts, deep copies and pickles never see oneDNN's opaque tensors.
_CAST_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _autocast_dtype() -> torch.dtype | None:
    if not torch.is_autocast_enabled("cpu"):
        return None
    return torch.get_autocast_dtype("cpu") if hasattr(torch, "get_autocast_dtype") else torch.get_autocast_cpu_dtype()


class Linear(nn.Linear):
    """nn.Linear with a CPU inference fast path: oneDNN called directly, GELU fusable.

    ATen sends fp32 CPU matmuls to the BLAS (MKL), which on AVX-512 AMD CPUs runs far below oneDNN's speed; in
    bf16 ATen's addmm is slower than oneDNN's linear, and autocast re-casts the weight on every call (here the
    cast is kept); a fused GELU saves a pass over the MLP's widest tensor. Which dtypes take the path depends on
    the CPU (`linear_dtypes`). Inference only (eval mode, no autograd); autocast to bf16 is honoured; training,
    other dtypes and export/trace/compile take the ordinary path. Same parameters, same state-dict names."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _current()  # the CPU is probed now, not inside a graph torch.compile traces

    def onednn_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype the oneDNN path computes `x` in, or None when the ordinary path must run."""
        if (
            x.device.type != "cpu"
            or self.training
            or torch.is_grad_enabled()
            or torch.jit.is_tracing()
            or torch.compiler.is_compiling()
            or torch.compiler.is_exporting()
        ):
            return None
        dtypes = _current().linear_dtypes
        if not dtypes:
            return None
        autocast = _autocast_dtype()
        if autocast is not None:
            weight = self.weight
            # A kept cast is keyed on the weight's version counter, which inference tensors lack.
            castable = weight.is_floating_point() and (weight.dtype == autocast or not weight.is_inference())
            return autocast if autocast in dtypes and castable else None
        if x.dtype == self.weight.dtype and x.dtype in dtypes:
            return x.dtype
        return None

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias in `dtype`. A cast (autocast over fp32 weights) is kept, packed in oneDNN's layout, from
        the second call that finds the weights unchanged; weights that change between calls (a DINOv2 teacher,
        updated every step) are cast per call, as autocast does, rather than held twice. Packing a weight
        already in `dtype` would double its memory for little gain."""
        weight = self.weight
        if weight.dtype == dtype:
            return weight, self.bias
        key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
        per_dtype = _CAST_WEIGHTS.setdefault(self, {})
        entry = per_dtype.get(dtype)
        if entry is not None and entry[0] == key and entry[1] is not None:
            return entry[1], entry[2]
        bias = None if self.bias is None else self.bias.detach().to(dtype)
        if entry is None or entry[0] != key:  # new or changed weights: cast for this call, remember the version
            per_dtype[dtype] = (key, None, None)
            return weight.detach().to(dtype), bias
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype))  # unchanged since: keep it
        per_dtype[dtype] = (key, packed, bias)
        return packed, bias

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        dtype = self.onednn_dtype(x)
        if dtype is None:
            out = super().forward(x)
            return F.gelu(out) if gelu else out
        weight, bias = self._weights(dtype)
        attr, algorithm = ("gelu", "none") if gelu else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight, bias, attr, [], algorithm)


def release_casts(module: nn.Module) -> None:
    """Drop the casts kept for `module`'s Linear layers: call it after updating their weights in place (an EMA
    step), so that casts of the old weights are not held until each layer's next call."""
    for layer in module.modules():
        _CAST_WEIGHTS.pop(layer, None)


class Mlp(nn.Sequential):
    """Linear, GELU, dropout, Linear (state-dict names 0 and 3); on the oneDNN path GELU runs inside the first."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__(Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, _, _, fc2 = self
        if isinstance(fc1, Linear) and fc1.onednn_dtype(x) is not None:  # swapped-in layers (int8) are not
            return fc2(fc1(x, gelu=True))
        return super().forward(x)


# ---- back to plain modules ----


def _plain_linear(layer: Linear) -> nn.Linear:
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight = layer.weight
    plain.bias = layer.bias
    return plain.train(layer.training)


def to_plain(module: nn.Module) -> nn.Module:
    """`module` with every fast-path layer replaced by its plain equivalent: `Linear` by an nn.Linear and `Mlp`
    by an nn.Sequential, holding the same parameter tensors under the same state-dict names, so that tools
    matching exact module types (torch.ao.quantization.quantize_dynamic) see them. Works in place on the
    children, as SyncBatchNorm.convert_sync_batchnorm does: deep-copy first to keep the original; use the
    returned module (the root itself is replaced when it is a fast-path layer). Hooks on replaced layers are
    not carried over."""
    if isinstance(module, Linear):
        return _plain_linear(module)
    if isinstance(module, Mlp):
        module = nn.Sequential(*module).train(module.training)
    for name, child in module.named_children():
        plain = to_plain(child)
        if plain is not child:
            setattr(module, name, plain)
    return module
