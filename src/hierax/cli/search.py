"""`hierax search QUERY... --index INDEX_DIR`: the indexed photos most like each query image."""

from __future__ import annotations

import argparse
import csv
import sys

from hierax.cli._options import add_model_options, model_kwargs

COMMAND = "search"
HELP = "find the photos of an index most similar to each query image"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queries", nargs="+", help="image files, folders (recursive), glob patterns, .txt/.csv lists")
    parser.add_argument("--index", required=True, help="INDEX_DIR written by `hierax index`")
    parser.add_argument("-k", type=int, default=10, help="matches per query (10)")
    parser.add_argument("--output", "-o", help="FILE.csv, .jsonl or .parquet (default: CSV on stdout)")
    add_model_options(parser)
    parser.set_defaults(model=None)  # the model the index records; --size and --tta follow the index too
    parser.epilog = "--model, --size and --tta default to those the index was built with; others are refused."


def run(args: argparse.Namespace) -> int:
    # imported here: keeps hierax --help fast
    from hierax.similar.search import SEARCH_COLUMNS, search_images

    options = model_kwargs(args)
    result = search_images(
        args.queries,
        args.index,
        args.model,
        k=args.k,
        output=args.output,
        size=options.pop("size"),
        tta=options.pop("tta") or None,
        **options,
    )
    if args.output is None:
        out = csv.DictWriter(sys.stdout, fieldnames=SEARCH_COLUMNS)
        out.writeheader()
        out.writerows(result.rows)
    for path, reason in result.errors:
        print(f"hierax search: {path}: {reason}", file=sys.stderr)
    searched = result.queries - len(result.errors)
    where = f" -> {result.output}" if result.output else ""
    print(
        f"hierax search: {searched} of {result.queries} queries searched, {len(result.rows)} matches{where}",
        file=sys.stderr,
    )
    if result.queries == 0:
        print("hierax search: error: no query images found", file=sys.stderr)
        return 1
    return 0 if searched > 0 else 1
