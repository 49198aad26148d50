"""Networks: `create_model(network, num_classes, **config)` and `list_networks()`.

This package imports no torch until a network is built: listing networks (`hierax models`, `hierax --help`)
must start in well under the 2 s that importing torch takes. So `create_model` and `HieraDet` load
`hierax.models.hieradet` on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hierax.models.configs import NETWORK_CONFIGS, HieraDetConfig, config_for, list_networks

if TYPE_CHECKING:
    from hierax.models.hieradet import HieraDet


def create_model(network: str, num_classes: int = 0, **config) -> HieraDet:
    """Build `network` with random weights; `config` overrides its HieraDetConfig fields."""
    cfg = config_for(network, **config)
    from hierax.models.hieradet import HieraDet  # imported here: keeps listing networks free of torch

    return HieraDet(cfg, num_classes=num_classes)


def __getattr__(name: str):
    if name == "HieraDet":
        from hierax.models.hieradet import HieraDet  # imported on first use: keeps listing networks free of torch

        return HieraDet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["NETWORK_CONFIGS", "HieraDet", "HieraDetConfig", "config_for", "create_model", "list_networks"]
