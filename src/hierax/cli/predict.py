"""`hierax predict PATHS...`: species for every image, written in chunks to CSV / JSONL / Parquet or stdout.
`hierax predict ROOT --detections MD.json`: a species for every box of a MegaDetector file (camera traps);
`--xmp`: XMP sidecars for photo libraries."""

from __future__ import annotations

import argparse
import csv
import sys

from hierax.cli._options import add_geo_options, add_model_options, add_open_set_arguments, geo_kwargs, model_kwargs
from hierax.errors import HieraxError

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
    add_camera_trap_arguments(parser)


def open_set_given(args: argparse.Namespace) -> bool:
    """Whether any of --extra-species / --only-extra / --unknown-threshold is given."""
    return args.extra_species is not None or args.unknown_threshold is not None or args.only_extra


def open_set_options(args: argparse.Namespace):
    """The OpenSet of --extra-species / --only-extra / --unknown-threshold, or None when none is given."""
    if not open_set_given(args):
        return None
    # imported here: keeps hierax --help fast
    from hierax.similar.openset import OpenSet

    return OpenSet.load(args.extra_species, only_extra=args.only_extra, threshold=args.unknown_threshold)


DETECTION_ONLY = ("detection_threshold", "classify_categories", "crop", "event_gap")


def add_camera_trap_arguments(parser: argparse.ArgumentParser) -> None:
    """The "camera traps and photo libraries" group: --detections and its options, --xmp."""
    group = parser.add_argument_group("camera traps and photo libraries")
    group.add_argument(
        "--detections",
        metavar="MD.json",
        help="MegaDetector batch output for the images under ROOT (the one path given): classify every box; "
        "-o x.json writes MegaDetector format, .csv/.jsonl/.parquet one row per box plus x.images.* and x.events.*",
    )
    group.add_argument(
        "--detection-threshold",
        type=float,
        metavar="T",
        help="classify boxes at or above T (default: the file's typical_detection_threshold, else 0.2)",
    )
    group.add_argument(
        "--classify-categories",
        metavar="NAMES",
        help="detector categories to classify, comma-separated names or ids (animal); the others pass through",
    )
    group.add_argument(
        "--crop",
        metavar="SHAPE[:CONTEXT[:EDGE]]",
        help="square or tight, context as a fraction of the box, pad or shift at the frame's edges (square:0.1:pad)",
    )
    group.add_argument(
        "--event-gap", type=float, metavar="SECONDS", help="seconds without a frame that start a new event (60)"
    )
    group.add_argument(
        "--xmp",
        action="store_true",
        help="write or update <photo>.xmp sidecars with species keywords (the photos are never touched)",
    )


def _print_rows(rows: list[dict]) -> None:
    out = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
    out.writeheader()
    out.writerows(rows)


def _run_detections(args: argparse.Namespace, options: dict) -> int:
    """`predict ROOT --detections MD.json`: hierax.inference.detections.predict_detections."""
    if len(args.paths) != 1:
        raise HieraxError("with --detections give one path: ROOT, the folder the detections file's paths start from")
    categories = [c.strip() for c in (args.classify_categories or "animal").split(",") if c.strip()]
    extra = {key: value for key in ("crop", "event_gap") if (value := getattr(args, key)) is not None}
    # imported here: keeps hierax --help fast
    from hierax.distributed import is_main_rank
    from hierax.inference.detections import predict_detections

    summary = predict_detections(
        args.paths[0],
        args.detections,
        args.model,
        output=args.output,
        errors_output=args.errors_output,
        threshold=args.detection_threshold,
        categories=categories,
        top_k=args.top_k,
        resume=args.resume,
        common_names=args.common_names,
        rollup=args.rollup or args.thresholds is not None,
        thresholds=args.thresholds,
        species_list=args.species_list,
        **geo_kwargs(args),
        xmp=args.xmp,
        **extra,
        **options,
    )
    if args.output is None and summary.rows:
        _print_rows(summary.rows)
    if is_main_rank():
        print(f"hierax predict: {summary.line()}", file=sys.stderr)
    return 0 if summary.succeeded + summary.skipped > 0 or summary.failed == 0 else 1


def run(args: argparse.Namespace) -> int:
    options = model_kwargs(args)
    if args.detections is not None:
        if open_set_given(args):
            raise HieraxError("--extra-species, --only-extra and --unknown-threshold do not work with --detections")
        return _run_detections(args, options)
    given = [f"--{name.replace('_', '-')}" for name in DETECTION_ONLY if getattr(args, name) is not None]
    if given:
        raise HieraxError(f"{', '.join(given)} only work with --detections MD.json")
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
        xmp=args.xmp,
        **geo_kwargs(args),
        **options,
    )
    if args.output is None and summary.rows:
        _print_rows(summary.rows)
    if is_main_rank():
        print(f"hierax predict: {summary.line()}", file=sys.stderr)
    return 0 if summary.succeeded + summary.skipped > 0 else 1
