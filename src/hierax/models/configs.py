"""The HieraDet family as data: hyper-parameters and network names, without torch.

Kept apart from the modules so that listing networks (`hierax models`, `hierax --help`, registry checks) starts
without importing torch.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from hierax.errors import ModelNotFoundError


@dataclass(frozen=True)
class HieraDetConfig:
    """Architecture hyper-parameters. window_spec is per stage; 0 means global attention."""

    depths: tuple[int, ...] = (1, 2, 11, 2)
    embed_dim: int = 96
    num_heads: int = 1
    pos_embed_size: tuple[int, int] = (7, 7)
    pos_embed_win_size: tuple[int, int] = (8, 8)
    global_blocks: tuple[int, ...] = (7, 10, 13)
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    drop_path_rate: float = 0.1
    mlp_ratio: float = 4.0
    mlp_dropout: float = 0.0
    layer_norm_eps: float = 1e-6
    q_stride: int = 2

    def updated(self, **overrides) -> HieraDetConfig:
        """A copy with `overrides` applied; list values become tuples; unknown keys raise TypeError."""
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        return replace(self, **fixed)

    def num_parameters(self, num_classes: int = 0) -> int:
        """The parameter count of the network this config builds, computed without building it."""
        dim = self.embed_dim
        count = 3 * 7 * 7 * dim + dim  # stem convolution
        count += dim * (self.pos_embed_size[0] * self.pos_embed_size[1])
        count += dim * (self.pos_embed_win_size[0] * self.pos_embed_win_size[1])
        for stage, depth in enumerate(self.depths):
            for block in range(depth):
                dim_out = dim * 2 if stage > 0 and block == 0 else dim
                hidden = int(dim_out * self.mlp_ratio)
                count += 2 * dim + 2 * dim_out  # norm1, norm2
                count += (dim * dim_out + dim_out) if dim != dim_out else 0  # shortcut projection
                count += dim * 3 * dim_out + 3 * dim_out + dim_out * dim_out + dim_out  # qkv, attention projection
                count += dim_out * hidden + hidden + hidden * dim_out + dim_out  # MLP
                dim = dim_out
        count += 2 * dim  # final LayerNorm
        return count + (dim * num_classes + num_classes if num_classes > 0 else 0)


_DEEP = dict(depths=(2, 3, 16, 3), pos_embed_size=(14, 14), global_blocks=(12, 16, 20))
NETWORK_CONFIGS: dict[str, HieraDetConfig] = {
    "hieradet_tiny": HieraDetConfig(depths=(1, 2, 7, 2), global_blocks=(5, 7, 9)),
    "hieradet_small": HieraDetConfig(),
    "hieradet_base": HieraDetConfig(**_DEEP),
    "hieradet_base_plus": HieraDetConfig(**_DEEP, embed_dim=112, num_heads=2),
    "hieradet_large": HieraDetConfig(
        depths=(2, 6, 36, 4), embed_dim=144, num_heads=2, global_blocks=(23, 33, 43), drop_path_rate=0.2
    ),
}
NETWORK_CONFIGS.update(
    {
        name.replace("hieradet_", "hieradet_d_"): replace(cfg, window_spec=(8, 4, 0, 0))
        for name, cfg in list(NETWORK_CONFIGS.items())
    }
)


def list_networks() -> list[str]:
    """Names of every architecture hierax can build."""
    return sorted(NETWORK_CONFIGS)


def config_for(network: str, **overrides) -> HieraDetConfig:
    """The config of `network` with `overrides` (HieraDetConfig fields) applied; ModelNotFoundError for an unknown
    name (suggesting close ones) or an unknown field."""
    if network not in NETWORK_CONFIGS:
        close = difflib.get_close_matches(network, list_networks(), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else f" Known networks: {', '.join(list_networks())}."
        raise ModelNotFoundError(f"Unknown network '{network}'.{hint}")
    try:
        return NETWORK_CONFIGS[network].updated(**overrides)
    except TypeError as err:
        raise ModelNotFoundError(f"Bad config for '{network}': {err}") from None
