"""`hierax evaluate DATASET`: accuracy (top-1/5, per class, per rank), confusions and calibration."""

from __future__ import annotations

import argparse

from hierax.cli._options import add_geo_options, add_model_options, geo_kwargs, model_kwargs

COMMAND = "evaluate"
HELP = "measure accuracy and calibration on a labelled dataset (class folders, iNat21 JSON or CSV)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="folder of class folders, iNat21 annotation .json, or path,label .csv")
    add_model_options(parser)
    parser.add_argument("--root", help="folder the dataset's relative image paths start from")
    parser.add_argument("--output-dir", help="write report.json, summary.txt and the PNG figures here")
    parser.add_argument("--common-names", help="JSON index -> common name (lets dataset labels be common names)")
    parser.add_argument("--confusion-classes", type=int, default=20, help="classes in the confusion matrix (20)")
    add_geo_options(parser)


def run(args: argparse.Namespace) -> int:
    options = model_kwargs(args)
    # imported here: keeps hierax --help fast
    from hierax.inference.evaluate import evaluate, format_summary

    report = evaluate(
        args.dataset,
        args.model,
        output_dir=args.output_dir,
        root=args.root,
        common_names=args.common_names,
        confusion_classes=args.confusion_classes,
        **geo_kwargs(args),
        **options,
    )
    print(format_summary(report))
    return 0 if report["evaluated"] else 1
