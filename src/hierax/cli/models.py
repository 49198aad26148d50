"""`hierax models`: the architectures and the pretrained weights, with resolution, size and cache state."""

from __future__ import annotations

import argparse
import json

import torch

from hierax.models import create_model, list_networks
from hierax.weights.catalog import list_weights
from hierax.weights.download import cached_path, is_cached

COMMAND = "models"
HELP = "list architectures and pretrained weights (resolution, file size, cached or not)"


def count_parameters(network: str, num_classes: int = 0) -> int:
    """Parameter count of a network, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(network, num_classes).parameters())


def models_table() -> dict:
    """Networks with parameter counts, and every registered weight with its cache state."""
    return {
        "networks": [{"network": n, "params_m": round(count_parameters(n) / 1e6, 1)} for n in list_networks()],
        "weights": [
            {
                "name": e.name,
                "aliases": list(e.aliases),
                "network": e.network,
                "resolution": list(e.resolution),
                "size_mib": e.size_mib,
                "cached": is_cached(e),
                "path": str(cached_path(e)),
                "description": e.description,
            }
            for e in list_weights()
        ],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    table = models_table()
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    print("Architectures (backbone parameters, millions):")
    for row in table["networks"]:
        print(f"  {row['network']:<22} {row['params_m']:>7.1f} M")
    print("\nPretrained weights:")
    print(f"  {'name':<40} {'network':<18} {'input':>9} {'size':>10}  cached")
    for row in table["weights"]:
        size = f"{row['size_mib']:.1f} MiB" if row["size_mib"] else "?"
        res = "x".join(map(str, row["resolution"]))
        print(f"  {row['name']:<40} {row['network']:<18} {res:>9} {size:>10}  {'yes' if row['cached'] else 'no'}")
        for alias in row["aliases"]:
            print(f"    alias: {alias}")
        print(f"    {row['description']}")
    return 0
