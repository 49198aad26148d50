"""What the fast-path tests share: tolerances, what this CPU and torch build offer, a tiny network, and a probe
of whether a call took oneDNN's Linear."""

import pytest
import torch

from hierax.models import create_model, fastpath
from tests.conftest import TINY

FP32_TOL = 1e-5
BF16_REL_TOL = 0.05
ONEDNN_OPS = hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()
NATIVE_BF16 = torch.bfloat16 in fastpath.onednn_linear_dtypes()
needs_native_bf16 = pytest.mark.skipif(
    not NATIVE_BF16, reason="this CPU has no native bf16 kernels: oneDNN refuses bf16, so ATen's path runs"
)


def tiny_net(network: str = "hieradet_d_tiny", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(network, 7, **TINY).eval()


def took_onednn(fn) -> tuple[torch.Tensor, bool]:
    """fn's output, and whether it ran oneDNN's Linear."""
    with torch.profiler.profile() as prof:
        out = fn()
    return out, any("linear_pointwise" in event.name for event in prof.events())
