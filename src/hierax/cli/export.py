"""`hierax export MODEL --format onnx|torchscript|pt2|safetensors --output FILE`: write a model to a file that
runs outside hierax's eager code, with its ModelInfo inside the file."""

from __future__ import annotations

import argparse
from pathlib import Path

from hierax.errors import HieraxError
from hierax.export import DTYPES, FORMATS, export_model
from hierax.weights.load import load_pretrained_model

COMMAND = "export"
HELP = "export a model to ONNX, TorchScript, torch.export (.pt2) or safetensors, metadata inside the file"
FORMATS_BY_SUFFIX = {suffix: fmt for fmt, suffix in FORMATS.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="registered name or checkpoint path (.pt, .safetensors)")
    parser.add_argument("--format", choices=sorted(FORMATS), help="default: from the output file's suffix")
    parser.add_argument("--output", "-o", required=True, type=Path, help="file to write")
    parser.add_argument("--dynamic-batch", action="store_true", help="accept any batch size (onnx, torchscript, pt2)")
    parser.add_argument(
        "--dynamic-size", action="store_true", help="accept any height and width (onnx; pt2: multiples of 32)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and compute dtype")
    parser.add_argument("--quantize", choices=["int8"], help="int8 dynamic quantisation of the Linear layers (cpu)")
    parser.add_argument("--size", type=int, nargs="+", metavar="PX", help="input size H [W] (default: the model's)")


def run(args: argparse.Namespace) -> int:
    fmt = args.format or FORMATS_BY_SUFFIX.get(args.output.suffix)
    if fmt is None:
        raise HieraxError(f"give --format: '{args.output.suffix}' is not one of {', '.join(FORMATS.values())}")
    if args.size and len(args.size) > 2:
        raise HieraxError("--size takes one or two numbers: H [W]")
    size = (args.size[0], args.size[-1]) if args.size else None
    net, info = load_pretrained_model(args.model, inference=True, new_size=size)
    path = export_model(
        net,
        info,
        args.output,
        fmt=fmt,
        dynamic_batch=args.dynamic_batch,
        dynamic_size=args.dynamic_size,
        dtype=args.dtype,
        quantize=args.quantize,
    )
    kind = f"{fmt}, {args.dtype}{', int8' if args.quantize else ''}"
    print(f"wrote {path} ({kind}, {path.stat().st_size / 2**20:.1f} MiB)")
    return 0
