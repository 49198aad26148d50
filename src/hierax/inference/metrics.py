"""Accuracy counting shared by evaluation and training's per-epoch validation: NumPy and torch alike, and
nothing heavier, so training can import it without pulling in the inference jobs."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def topk_correct(top: Array, labels: Array) -> tuple[Array, Array]:
    """Top-1 and top-k hits per sample from best-first predictions (N, k) and labels (N,), as NumPy arrays or
    tensors."""
    hits = top == labels[:, None]
    return hits[:, 0], hits.any(1)
