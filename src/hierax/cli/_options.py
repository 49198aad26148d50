"""Options shared by `hierax predict`, `hierax embed` and `hierax evaluate`."""

from __future__ import annotations

import argparse
import os

from hierax.errors import HieraxError
from hierax.inference.predict import DEFAULT_MODEL


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --size, --batch-size, --workers, --device, --amp, --tta, --quiet."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name or checkpoint path ({DEFAULT_MODEL})")
    parser.add_argument("--size", type=int, nargs="+", metavar=("H", "W"), help="input size (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (16)")
    parser.add_argument("--workers", type=int, help="decoding processes (default: min(4, CPU count))")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: this rank's GPU if any, else CPU)")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation: 5 crops, averaged")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def size_of(args: argparse.Namespace) -> tuple[int, int] | None:
    """The --size value as (H, W): one number means a square."""
    if not args.size:
        return None
    if len(args.size) > 2:
        raise HieraxError("--size takes H or H W")
    return (args.size[0], args.size[-1])


def model_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of predict / embed / evaluate from the shared options."""
    return {
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": args.device,
        "amp": args.amp,
        "tta": args.tta,
        "size": size_of(args),
        "progress": not args.quiet,
    }


def is_main_rank() -> bool:
    """True outside torchrun and on its rank 0."""
    return os.environ.get("RANK", "0") == "0"
