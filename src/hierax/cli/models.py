"""`hierax models`: the architectures and the pretrained weights, with resolution, classes, size and cache state.
Reads the registry as data: no torch, no download."""

from __future__ import annotations

import argparse
import json

COMMAND = "models"
HELP = "list architectures and pretrained weights (resolution, classes, file size, cached or not)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _classes(num_classes: int | None) -> str:
    return "?" if num_classes is None else "backbone" if num_classes == 0 else f"{num_classes:,}"


def run(args: argparse.Namespace) -> int:
    from hierax.weights.describe import models_table  # imported here: keeps hierax --help fast

    table = models_table()
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    print("Architectures (backbone parameters, millions):")
    for row in table["networks"]:
        params = f"{row['params_m']:>7.1f} M" if row["params_m"] is not None else "      ? M"
        print(f"  {row['network']:<22} {params}")
    print("\nPretrained weights:")
    print(f"  {'name':<40} {'network':<18} {'input':>9} {'classes':>9} {'size':>10}  cached")
    for row in table["weights"]:
        size = f"{row['size_mib']:.1f} MiB" if row["size_mib"] else "?"
        res = "x".join(map(str, row["resolution"]))
        cached = "yes" if row["cached"] else "no"
        classes = _classes(row["num_classes"])
        print(f"  {row['name']:<40} {row['network']:<18} {res:>9} {classes:>9} {size:>10}  {cached}")
        for alias in row["aliases"]:
            print(f"    alias: {alias}")
        if row["description"]:
            print(f"    {row['description']}")
    return 0
