"""A HieraDet compiled for inference with torch.compile (inductor): the `inductor` backend of predict and evaluate.

On the CPU inductor's freezing turns the weights into constants (prepacked GEMMs with fused epilogues). Compiling
costs time on the first batch of each new input shape, so the wrapper keeps one shape per run: the largest batch
seen so far sets the compiled batch size, and a smaller batch (the last, partial one of a run) is padded up to it
with zeros and its outputs cut back. A larger batch or another image size compiles once more.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from hierax.models.fastpath import linear_dtypes, to_plain

logger = logging.getLogger(__name__)


class CompiledNet(nn.Module):
    """`net` (a HieraDet) with `embedding` compiled; `classify` (one Linear) and `forward` on top, as on the net.

    `compile_seconds` adds up the time of the calls that compiled a new graph; `shapes` lists those inputs'
    (batch, channels, height, width)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        # the plain modules: inductor fuses and prepacks ATen's Linear itself, the fast path's kernels are opaque
        self.net = to_plain(net)
        self._embedding = torch.compile(self.net.embedding, dynamic=False)
        self.compile_seconds = 0.0
        self.shapes: list[tuple[int, ...]] = []

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, C) embedding through the compiled graph; a batch smaller than the compiled one is padded."""
        count = x.shape[0]
        compiled = max((shape[0] for shape in self.shapes if shape[1:] == tuple(x.shape[1:])), default=0)
        if count < compiled:
            x = torch.cat([x, x.new_zeros((compiled - count, *x.shape[1:]))])
        shape = tuple(x.shape)
        if shape in self.shapes:
            return self._embedding(x)[:count]
        if not self.shapes:
            _warn_if_slower_than_eager(x)
        start = time.perf_counter()
        with torch._inductor.config.patch(freezing=x.device.type == "cpu"):
            out = self._embedding(x)
        seconds = time.perf_counter() - start
        self.compile_seconds += seconds
        self.shapes.append(shape)
        logger.info("Compiled the model for input %s in %.1f s", "x".join(map(str, shape)), seconds)
        return out[:count]

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """Logits from an embedding (eager: one Linear)."""
        return self.net.classify(embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embedding(x))


def _warn_if_slower_than_eager(x: torch.Tensor) -> None:
    """Inductor's frozen fp32 Linear layers run on MKL on x86, where on AVX-512 CPUs the eager fast path calls
    oneDNN: the compiled fp32 network is then slower than the default backend (benchmarks/README.md, Zen 4)."""
    fp32 = x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    if x.device.type == "cpu" and fp32 and torch.float32 in linear_dtypes():
        logger.warning(
            "backend inductor in float32 runs slower than the default backend on this CPU (its fp32 GEMMs use MKL, "
            "the default backend oneDNN): use the default backend, or inductor with --amp (bf16)"
        )
