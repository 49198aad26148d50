"""`hierax export MODEL --format onnx|torchscript|pt2|safetensors --output FILE`: write a model to a file that
runs outside hierax's eager code, with its ModelInfo inside the file."""

from __future__ import annotations

import argparse
from pathlib import Path

from hierax.errors import HieraxError
from hierax.sizes import add_size_option, size_from
from hierax.weights.formats import EXPORT_DTYPES, EXPORT_FORMATS, export_format_for

COMMAND = "export"
HELP = "export a model to ONNX, TorchScript, torch.export (.pt2) or safetensors, metadata inside the file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="registered name or checkpoint path (.pt, .safetensors)")
    parser.add_argument("--format", choices=sorted(EXPORT_FORMATS), help="default: from the output file's suffix")
    parser.add_argument("--output", "-o", required=True, type=Path, help="file to write")
    parser.add_argument("--dynamic-batch", action="store_true", help="accept any batch size (onnx, torchscript, pt2)")
    parser.add_argument(
        "--dynamic-size", action="store_true", help="accept any height and width (onnx; pt2: multiples of 32)"
    )
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32", help="weights and compute dtype")
    parser.add_argument("--quantize", choices=["int8"], help="int8 dynamic quantisation of the Linear layers (cpu)")
    parser.add_argument(
        "--int8-weight-bits",
        type=int,
        choices=[7, 8],
        help="ONNX int8 weights (default: 8 where this CPU has VNNI, else 7; 8-bit weights are closer to fp32 but "
        "saturate on x86 CPUs without VNNI)",
    )
    add_size_option(parser, "input size (default: the model's)")


def run(args: argparse.Namespace) -> int:
    fmt = args.format or export_format_for(args.output)
    size = size_from(args.size)
    if args.output.exists() and args.output.is_dir():
        raise HieraxError(f"--output {args.output} is a folder: give the file to write")
    # imported here: keeps hierax --help fast
    from hierax.export.write import export_model
    from hierax.weights.load import load_pretrained_model

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
        int8_weight_bits=args.int8_weight_bits,
    )
    kind = f"{fmt}, {args.dtype}{', int8' if args.quantize else ''}"
    print(f"wrote {path} ({kind}, {path.stat().st_size / 2**20:.1f} MiB)")
    return 0
