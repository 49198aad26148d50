"""`hierax export MODEL --format onnx|torchscript|pt2|safetensors --output FILE`: write a model to a file that
runs outside hierax's eager code, with its ModelInfo inside the file. `--check PHOTOS` then runs the written file
beside the model it came from on those photos and reports how often their answers agree (and their speeds), so
that an int8 or bf16 file is judged on the user's own photos and CPU."""

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
    parser.add_argument(
        "--check",
        nargs="+",
        metavar="PHOTOS",
        help="after writing, compare the file with the model on these images, folders, globs or list files: "
        "top-1 agreement, top-5 overlap, changed answers, speed of each",
    )
    parser.add_argument(
        "--min-top1",
        type=float,
        metavar="SHARE",
        help="with --check: exit with an error when the top-1 agreement is below this share, e.g. 0.99 (the file "
        "is kept)",
    )


def run(args: argparse.Namespace) -> int:
    fmt = args.format or export_format_for(args.output)
    size = size_from(args.size)
    if args.output.exists() and args.output.is_dir():
        raise HieraxError(f"--output {args.output} is a folder: give the file to write")
    if args.min_top1 is not None and not args.check:
        raise HieraxError("--min-top1 needs --check PHOTOS: the photos to measure the agreement on")
    if args.min_top1 is not None and not 0 <= args.min_top1 <= 1:
        raise HieraxError(f"--min-top1 is a share between 0 and 1 (0.99 for 99%), got {args.min_top1}")
    if args.check:
        from hierax.data.sources import find_images

        find_images(args.check)  # no photos to check on: stop before the export, not after it
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
    if not args.check:
        return 0
    from hierax.inference.agreement import compare_models

    any_batch = args.dynamic_batch or fmt == "safetensors"
    result = compare_models((net, info), path, args.check, batch_size=8 if any_batch else 1)
    print(result.summary())
    if args.min_top1 is not None and result.top1 < args.min_top1:
        raise HieraxError(
            f"top-1 agreement {result.top1:.1%} is below --min-top1 {args.min_top1:.1%}; {path} is kept: delete it, "
            "or export another way (a float32 or bf16 file, or int8 with other --int8-weight-bits)"
        )
    return 0
