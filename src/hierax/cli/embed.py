"""`hierax embed PATHS... --output FILE.parquet|.npy`: float32 image embeddings, written in chunks."""

from __future__ import annotations

import argparse
import sys

from hierax.cli._options import add_model_options, model_kwargs

COMMAND = "embed"
HELP = "write image embeddings (and pooled stage features) to .parquet or .npy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", help="image files, folders (recursive), glob patterns, .txt/.csv lists")
    parser.add_argument("--output", "-o", required=True, help="FILE.parquet or FILE.npy (+ FILE.paths.txt)")
    add_model_options(parser)
    parser.add_argument(
        "--features", nargs="+", default=[], metavar="STAGE", help="also save pooled stage features: stage1 ... stage4"
    )
    parser.add_argument("--errors-output", help="path,reason file for bad images (default: <output>.errors.csv)")
    parser.add_argument("--resume", action="store_true", help="skip paths already in --output")


def run(args: argparse.Namespace) -> int:
    options = model_kwargs(args)
    # imported here: keeps hierax --help fast
    from hierax.distributed import is_main_rank
    from hierax.inference.predict import embed

    summary = embed(
        args.paths,
        args.model,
        output=args.output,
        errors_output=args.errors_output,
        features=args.features,
        resume=args.resume,
        **options,
    )
    if is_main_rank():
        print(f"hierax embed: {summary.line()}", file=sys.stderr)
    return 0 if summary.succeeded + summary.skipped > 0 else 1
