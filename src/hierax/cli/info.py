"""`hierax info NAME|PATH`: classes, input size, rgb stats, parameter count and file format of a model; for a
registered name whose file is not cached, what the registry knows (offline, without downloading)."""

from __future__ import annotations

import argparse
import json

COMMAND = "info"
HELP = "describe a model file or registered name (classes, input size, rgb stats, parameters, format)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="registered name, model file (.pt, .safetensors, .onnx, .ts, .pt2) or run folder")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from hierax.weights.describe import describe  # imported here: keeps hierax --help fast

    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for key, value in info.items():
        if value is not None and value not in ({}, []):
            print(f"{key:>15}: {value}")
    return 0
