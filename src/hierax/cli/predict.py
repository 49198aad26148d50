"""`hierax predict PATHS...`: species for every image, written in chunks to CSV / JSONL / Parquet or stdout."""

from __future__ import annotations

import argparse
import csv
import sys

from hierax.cli._options import add_model_options, model_kwargs

COMMAND = "predict"
HELP = "identify the species in images, folders, globs or path lists"


def parse_thresholds(text: str) -> dict[str, float]:
    """'species=0.8,genus=0.6' -> {'species': 0.8, 'genus': 0.6}; the ranks are checked by the library."""
    thresholds = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        rank, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not rank.strip() or number is None:
            raise argparse.ArgumentTypeError(f"bad threshold '{item}': use rank=value, e.g. species=0.8")
        thresholds[rank.strip()] = number
    return thresholds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", help="image files, folders (recursive), glob patterns, .txt/.csv lists")
    add_model_options(parser)
    parser.add_argument("--top-k", type=int, default=5, help="labels per image (5)")
    parser.add_argument("--output", "-o", help="FILE.csv, .jsonl or .parquet (default: CSV on stdout)")
    parser.add_argument("--errors-output", help="path,reason file for bad images (default: <output>.errors.csv)")
    parser.add_argument("--resume", action="store_true", help="skip paths already in --output")
    parser.add_argument("--common-names", help="JSON index -> common name, or an iNat21 annotation JSON")
    parser.add_argument("--rollup", action="store_true", help="report the deepest confident taxonomic rank")
    parser.add_argument(
        "--thresholds", type=parse_thresholds, help="roll-up thresholds (default species=0.8,genus=0.6,family=0.4)"
    )
    parser.add_argument(
        "--species-list", help="file of allowed species (one per line); probabilities renormalised over them"
    )


def run(args: argparse.Namespace) -> int:
    options = model_kwargs(args)
    # imported here: keeps hierax --help fast
    from hierax.distributed import is_main_rank
    from hierax.inference.predict import predict

    summary = predict(
        args.paths,
        args.model,
        output=args.output,
        errors_output=args.errors_output,
        top_k=args.top_k,
        resume=args.resume,
        common_names=args.common_names,
        rollup=args.rollup or args.thresholds is not None,
        thresholds=args.thresholds,
        species_list=args.species_list,
        **options,
    )
    if args.output is None and summary.rows:
        out = csv.DictWriter(sys.stdout, fieldnames=list(summary.rows[0]))
        out.writeheader()
        out.writerows(summary.rows)
    if is_main_rank():
        print(f"hierax predict: {summary.line()}", file=sys.stderr)
    return 0 if summary.succeeded + summary.skipped > 0 else 1
