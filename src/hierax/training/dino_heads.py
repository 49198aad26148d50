"""Projection heads of DINOv2 pretraining, and the student that carries them.

A head is an MLP to a small L2-normalised bottleneck, then scores against K weight-normalised prototypes. The
DINO head scores pooled image embeddings; a separate iBOT head scores stage-4 tokens. The student is the
backbone, both heads and the iBOT mask token; the teacher is its EMA copy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hierax.models import create_model
from hierax.models.hieradet import HieraDet
from hierax.training.dino_recipe import DinoConfig


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


class DinoStudent(nn.Module):
    """Backbone, DINO head, iBOT head and mask token: the trainable module; its EMA copy is the teacher."""

    def __init__(self, backbone: HieraDet, config: DinoConfig) -> None:
        super().__init__()
        dim = backbone.embedding_size
        head = dict(
            hidden_dim=config.head_hidden_dim, bottleneck_dim=config.head_bottleneck_dim, layers=config.head_layers
        )
        self.backbone = backbone
        self.dino_head = DINOHead(dim, config.num_prototypes, **head)
        self.ibot_head = DINOHead(dim, config.ibot_prototypes or config.num_prototypes, **head)
        self.mask_token = nn.Parameter(torch.zeros(backbone.config.embed_dim))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's block activations in backward (the engine's `grad_checkpointing`)."""
        self.backbone.set_grad_checkpointing(enable)

    def encode(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled (B, C), normalised stage-4 tokens (B, h, w, C)); `token_mask` masks stem tokens."""
        tokens = self.backbone.features[0](self.backbone.forward_features(x, token_mask, self.mask_token))
        return tokens.mean(dim=(1, 2)), tokens

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Head outputs: `global` (2B, K) and `local` (NB, K) prototype scores, `patches` (M, K) for the stage-4
        tokens selected by `masks` (2B, h, w), and the pooled global embeddings `pooled` (2B, C)."""
        pooled, tokens = self.encode(global_crops, token_mask)
        # one pass of the DINO head for all crops: the normalised prototypes are then kept for backward once
        embeddings = pooled if local_crops is None else torch.cat([pooled, self.encode(local_crops)[0]])
        scores = self.dino_head(embeddings)
        out = {"pooled": pooled, "global": scores[: pooled.shape[0]]}
        if local_crops is not None:
            out["local"] = scores[pooled.shape[0] :]
        if masks is not None:
            out["patches"] = self.ibot_head(tokens[masks])
        return out


def build_student(network: str, config: DinoConfig, **network_config) -> DinoStudent:
    """A DinoStudent around a fresh `network` backbone (no classifier, DINOv2's truncated-normal init of the Linear
    layers); `network_config` overrides its config."""
    backbone = create_model(network, 0, **network_config)
    backbone.init_linear_layers()
    return DinoStudent(backbone, config)
