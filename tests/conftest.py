"""Shared fixtures: the reference fill rule, tiny models, real photos and a local HTTP server."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"


def fill_reference(net: torch.nn.Module) -> None:
    """Set every state-dict entry by the fill rule of make_hieradet_reference.py (seeded by crc32 of its key)."""
    new = {}
    for key, tensor in net.state_dict().items():
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        values = torch.randn(tensor.shape, generator=g, dtype=torch.float32)
        is_norm_scale = tensor.ndim == 1 and key.endswith(".weight")
        new[key] = 1.0 + 0.1 * values if is_norm_scale else 0.02 * values
    net.load_state_dict(new)


@pytest.fixture(scope="session")
def reference_npz():
    arrays = np.load(DATA / "hieradet_reference.npz")
    meta = json.loads(bytes(arrays["meta.json"]).decode())
    return arrays, meta
