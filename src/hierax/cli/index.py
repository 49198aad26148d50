"""`hierax index PATHS... --output INDEX_DIR`: embed photos into a similar-photo index (or add them to one)."""

from __future__ import annotations

import argparse
import sys

from hierax.cli._options import add_model_options, model_kwargs

COMMAND = "index"
HELP = "build a similar-photo index of images (or add images to one); optionally list near-duplicates"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", help="image files, folders (recursive), glob patterns, .txt/.csv lists")
    parser.add_argument("--output", "-o", required=True, help="INDEX_DIR: a new folder, or an index to add to")
    add_model_options(parser)
    parser.add_argument("--resume", action="store_true", help="continue a run that was interrupted")
    parser.add_argument(
        "--duplicates",
        type=float,
        metavar="THRESHOLD",
        help="also write INDEX_DIR/duplicates.csv: every pair of photos at least this similar (cosine, e.g. 0.95)",
    )


def run(args: argparse.Namespace) -> int:
    # imported here: keeps hierax --help fast
    from hierax.distributed import is_main_rank
    from hierax.similar.index import build_index

    summary = build_index(
        args.paths, args.model, output=args.output, resume=args.resume, duplicates=args.duplicates, **model_kwargs(args)
    )
    if not is_main_rank():
        return 0
    print(f"hierax index: {summary.line()}", file=sys.stderr)
    if summary.run.total == 0:
        print("hierax index: error: no images found", file=sys.stderr)
        return 1
    return 0 if summary.index is not None and len(summary.index) > 0 else 1
