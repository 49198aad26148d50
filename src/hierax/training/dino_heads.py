"""Projection heads of DINOv2 pretraining: an MLP to a small L2-normalised bottleneck, then scores against K
weight-normalised prototypes. The DINO head scores pooled image embeddings; a separate iBOT head scores
stage-4 tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """MLP (`layers` Linear layers, GELU between, `hidden_dim` wide) -> `bottleneck_dim` -> L2 norm -> prototypes.

    The prototype layer is a weight-normalised Linear without bias whose gain is fixed at 1, i.e. a dot product
    with unit-norm prototypes: scores lie in [-1, 1] before the temperature. Written as a plain parameter
    normalised in forward, so the state dict holds one `prototypes` tensor (K, bottleneck_dim)."""

    def __init__(
        self,
        in_dim: int,
        num_prototypes: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError("a DINO head needs at least one layer")
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mlp: list[nn.Module] = []
        for i in range(layers):
            mlp.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mlp.append(nn.GELU())
        self.mlp = nn.Sequential(*mlp)
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, bottleneck_dim))
        self.num_prototypes = num_prototypes
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # as nn.Linear's default init (DINOv2 leaves its weight-normed last layer so): rows of norm ~0.58 whatever
        # the width. Adam moves each entry by ~lr a step, so the raw norm sets how fast the prototypes turn.
        bound = 1.0 / math.sqrt(self.prototypes.shape[1])
        nn.init.uniform_(self.prototypes, -bound, bound)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck features (…, bottleneck_dim)."""
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prototype scores (…, K) of input features (…, in_dim)."""
        return F.linear(self.bottleneck(x), F.normalize(self.prototypes, dim=-1, eps=1e-6))

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The prototypes: frozen at the start of training so the targets settle before they move."""
        return [self.prototypes]
