"""`hierax predict PATHS...`: species for every image, written in chunks to CSV / JSONL / Parquet or stdout."""

from __future__ import annotations

import argparse
import csv
import sys

from hierax.cli._options import add_geo_options, add_model_options, geo_kwargs, model_kwargs, probability

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
    add_geo_options(parser)
    add_open_set_arguments(parser)


def add_open_set_arguments(parser: argparse.ArgumentParser) -> None:
    """The "species of your own" group: few-shot species in the ranking, and "unknown" for a low best score."""
    own = parser.add_argument_group(
        "species of your own",
        "species fitted from a few photos each (hierax fewshot fit) ranked with the model's classes, and "
        "'unknown' where the best score is low",
    )
    own.add_argument("--extra-species", metavar="SPECIES", help="a few-shot species file made with this model")
    own.add_argument("--only-extra", action="store_true", help="rank the extra species alone (no model classes)")
    own.add_argument(
        "--unknown-threshold",
        type=probability,
        metavar="P",
        help="best probability below P -> 'unknown' (default: the extra species' calibrated threshold)",
    )


def open_set_options(args: argparse.Namespace):
    """The OpenSet of --extra-species / --only-extra / --unknown-threshold, or None when none is given."""
    if args.extra_species is None and args.unknown_threshold is None and not args.only_extra:
        return None
    # imported here: keeps hierax --help fast
    from hierax.similar.openset import OpenSet

    return OpenSet.load(args.extra_species, only_extra=args.only_extra, threshold=args.unknown_threshold)


def run(args: argparse.Namespace) -> int:
    options = model_kwargs(args)
    open_set = open_set_options(args)
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
        open_set=open_set,
        **geo_kwargs(args),
        **options,
    )
    if args.output is None and summary.rows:
        out = csv.DictWriter(sys.stdout, fieldnames=list(summary.rows[0]))
        out.writeheader()
        out.writerows(summary.rows)
    if is_main_rank():
        print(f"hierax predict: {summary.line()}", file=sys.stderr)
    return 0 if summary.succeeded + summary.skipped > 0 else 1
