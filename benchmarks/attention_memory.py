"""What a training forward saves for backward under each attention form: deterministic, unlike peak RSS.

Counts, with `torch.autograd.graph.saved_tensors_hooks`, the distinct storages one training-mode forward keeps
for its backward (bf16 autocast where this CPU has native bf16, fp32 elsewhere), for the fused kernel
everywhere, the fast path's own choice (two matmuls in training only up to `fastpath`'s token limit) and two
matmuls everywhere, then the per-call difference between the two forms for each attention shape of the network.

    python benchmarks/attention_memory.py [--network hieradet_d_small] [--size 256] [--batch 16]
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

import hierax.models.hieradet as hieradet
from hierax.models import create_model, fastpath

MIB = 2**20


def saved_bytes(fn, besides: frozenset[int] = frozenset()) -> tuple[int, object]:
    """(bytes of the distinct storages autograd saves while fn runs, leaving out those in `besides`; fn's result)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in besides:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def per_call(net: torch.nn.Module, x: torch.Tensor, autocast, form) -> list[tuple[tuple, tuple, int]]:
    """(q shape, k shape, bytes of new tensors saved inside the call) for every attention call of one forward."""
    calls = []

    def spy(q, k, v):
        inputs = frozenset(t.untyped_storage().data_ptr() for t in (q, k, v))
        saved, out = saved_bytes(lambda: form(q, k, v), inputs)
        calls.append((tuple(q.shape), tuple(k.shape), saved))
        return out

    original = hieradet.attention
    hieradet.attention = spy
    try:
        with autocast():
            net(x)
    finally:
        hieradet.attention = original
    return calls


def two_matmuls(q, k, v):
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="hieradet_d_small")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    net = create_model(args.network, 10).train()
    x = torch.randn(args.batch, 3, args.size, args.size)
    bf16 = torch.bfloat16 in fastpath.native_half_dtypes()

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def forward():
        with autocast():
            net(x)

    print(f"{args.network}, {args.size} px, batch {args.batch}, {'bf16 autocast' if bf16 else 'fp32'}")
    for label, choice in (("fused everywhere", False), ("the fast path's rule", None), ("two matmuls", True)):
        with fastpath.fast_path(matmul_attention=choice):
            print(f"  {label:<22} {saved_bytes(forward)[0] / MIB:8.0f} MiB saved for backward")
    fused = per_call(net, x, autocast, F.scaled_dot_product_attention)
    matmuls = per_call(net, x, autocast, two_matmuls)
    print("  per call, new tensors saved: two matmuls / fused kernel")
    for (q, k, m), (_, _, f) in zip(matmuls, fused):
        print(f"    q {q} k {k}: {m / MIB:6.1f} / {f / MIB:5.1f} MiB")


if __name__ == "__main__":
    main()
