"""`hierax fewshot fit REFS --output SPECIES.safetensors`: species of your own from a few photos each, no training;
`hierax fewshot show SPECIES.safetensors` prints what a file holds."""

from __future__ import annotations

import argparse
import json
import sys

from hierax.cli._options import add_model_options, model_kwargs

COMMAND = "fewshot"
HELP = "fit species of your own from a few reference photos each (prototypes on the model's embeddings)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    fit = actions.add_parser("fit", help="fit species from REFS", description="fit species from REFS")
    fit.add_argument("refs", help="a folder of class folders (REFS/<species>/<photos>) or a path,label CSV")
    fit.add_argument("--output", "-o", required=True, help="SPECIES.safetensors")
    fit.add_argument(
        "--background",
        metavar="INDEX_DIR",
        help="an index (same model) of photos that are mostly none of these species: better 'unknown' calls",
    )
    add_model_options(fit)
    show = actions.add_parser("show", help="print what a species file holds", description="print a species file")
    show.add_argument("file", help="SPECIES.safetensors")


def run(args: argparse.Namespace) -> int:
    # imported here: keeps hierax --help fast
    from hierax.similar.fewshot import ExtraSpecies, fit_fewshot

    if args.action == "show":
        species = ExtraSpecies.load(args.file)
        summary = {
            "species": dict(zip(species.class_names, species.counts)),
            "model": species.model.describe(),
            "species_rule": vars(species.species_rule),
            "open_set_rule": vars(species.open_set_rule),
            "unknown_threshold": species.unknown_threshold,
            "leave_one_out": species.loo,
        }
        print(json.dumps(summary, indent=2))
        return 0
    species = fit_fewshot(args.refs, args.model, output=args.output, background=args.background, **model_kwargs(args))
    loo = species.loo
    print(
        f"hierax fewshot: {len(species)} species from {sum(species.counts)} photos; leave-one-out accuracy "
        f"{loo['accuracy']:.3f} over {loo['photos']} photos; unknown threshold {species.unknown_threshold:.3f} "
        f"-> {args.output}",
        file=sys.stderr,
    )
    return 0
