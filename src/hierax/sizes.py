"""One syntax and one check for input sizes, in every command and library call: `384`, `384 512`,
`384x512` (also `384,512`) all mean (H, W). Torch-free, so the command line parses sizes without loading it."""

from __future__ import annotations

import argparse
import numbers
from collections.abc import Sequence

from hierax.errors import HieraxError

# HieraDet's stem and three poolings need at least one stage-4 token: a side of 29 pixels gives one.
MIN_SIDE = 29
MAX_SIDE = 16384


def check_size(size: int | Sequence[int], *, what: str = "size") -> tuple[int, int]:
    """(H, W) from an int (a square) or one or two ints; HieraxError unless each side is in [29, 16384]."""
    sides = [size] if isinstance(size, numbers.Integral) else list(size)
    if len(sides) not in (1, 2) or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in sides):
        raise HieraxError(f"{what} must be one or two whole numbers (H or H W), got {size!r}")
    h, w = int(sides[0]), int(sides[-1])
    for side in (h, w):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise HieraxError(f"{what} sides must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {h}x{w}")
    return (h, w)


def parse_size(tokens: str | Sequence[str], *, what: str = "--size") -> tuple[int, int]:
    """(H, W) from command-line tokens: ["384"], ["384", "512"], ["384x512"] or "384x512"."""
    text = tokens if isinstance(tokens, str) else " ".join(tokens)
    parts = text.lower().replace("x", " ").replace(",", " ").split()
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        raise HieraxError(f"{what} takes N, H W or HxW (e.g. 384, 384 512, 384x512), got '{text}'") from None
    return check_size(sides, what=what)


def add_size_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str, **kwargs) -> None:
    """Add `--size` taking N, H W or HxW; read it back with `size_from(args.size)`."""
    parser.add_argument("--size", nargs="+", metavar="SIZE", help=f"{help}; N, H W or HxW", **kwargs)


def size_from(value: Sequence[str] | tuple[int, int] | int | None) -> tuple[int, int] | None:
    """The (H, W) of an `add_size_option` value (None when the option was not given; defaults pass through
    the same check)."""
    if value is None:
        return None
    if isinstance(value, str) or (isinstance(value, Sequence) and any(isinstance(v, str) for v in value)):
        return parse_size(value)
    return check_size(value)
