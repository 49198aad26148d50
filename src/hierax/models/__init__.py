"""Networks: `create_model(network, num_classes, **config)` and `list_networks()`."""

from __future__ import annotations

import difflib

from hierax.errors import ModelNotFoundError
from hierax.models.hieradet import NETWORK_CONFIGS, HieraDet, HieraDetConfig


def list_networks() -> list[str]:
    """Names of every architecture hierax can build."""
    return sorted(NETWORK_CONFIGS)


def create_model(network: str, num_classes: int = 0, **config) -> HieraDet:
    """Build `network` with random weights; `config` overrides its HieraDetConfig fields."""
    if network not in NETWORK_CONFIGS:
        close = difflib.get_close_matches(network, list_networks(), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else f" Known networks: {', '.join(list_networks())}."
        raise ModelNotFoundError(f"Unknown network '{network}'.{hint}")
    try:
        cfg = NETWORK_CONFIGS[network].updated(**config)
    except TypeError as err:
        raise ModelNotFoundError(f"Bad config for '{network}': {err}") from None
    return HieraDet(cfg, num_classes=num_classes)


__all__ = ["HieraDet", "HieraDetConfig", "create_model", "list_networks"]
