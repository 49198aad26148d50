"""`hierax geoprior fit|info|map`: fit a location/date prior from an iNat21-format annotation file, describe one,
or draw a species' presence on a world map. A thin shell over `hierax.geo`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hierax.errors import HieraxError

COMMAND = "geoprior"
HELP = "fit, describe or map a location/date prior that re-weights species by where and when"


def _species_count(text: str) -> int | None:
    if text.lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of species or 'all', got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError("the number of species per step must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    fit = actions.add_parser("fit", help="fit a prior from an iNat21-format annotation JSON")
    fit.add_argument("annotations", type=Path, help="iNat21-format JSON (images with latitude/longitude/date)")
    fit.add_argument(
        "--model",
        required=True,
        help="the image model whose classes the prior follows: registry name, "
        "checkpoint, or a class list (.txt one name per line, .json list)",
    )
    fit.add_argument("--output", type=Path, required=True, help="the prior file to write (.safetensors)")
    fit.add_argument("--epochs", type=int, default=10, help="passes over the records (10)")
    fit.add_argument("--batch-size", type=int, default=2048, help="records per step, plus as many background points")
    fit.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, cosine schedule)")
    fit.add_argument("--no-date", action="store_true", help="location only (default: location and day of year)")
    fit.add_argument(
        "--species-per-step",
        type=_species_count,
        default=2048,
        help="absent species sampled per step for the loss, or 'all' for the exact full loss (2048)",
    )
    fit.add_argument(
        "--pos-weight", type=float, help="weight of an observed species' presence (default: min(2048, 2 x species))"
    )
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--checkpoint-every", type=int, default=500, help="steps between state saves (0: epoch ends)")
    fit.add_argument("--resume", action="store_true", help="continue an interrupted fit exactly")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")

    info = actions.add_parser("info", help="describe a prior file")
    info.add_argument("prior", type=Path)
    info.add_argument("--json", action="store_true", help="print JSON")

    draw = actions.add_parser("map", help="draw a species' presence on a world map")
    draw.add_argument("prior", type=Path)
    draw.add_argument("--species", required=True, help="class name, binomial ('Corvus corax') or common name")
    draw.add_argument("--output", type=Path, required=True, help="image file to write (.png)")
    draw.add_argument("--date", help="YYYY-MM-DD (default: the highest presence over the year)")
    draw.add_argument("--resolution", type=float, default=1.0, help="grid step in degrees (1.0)")


def _fit(args: argparse.Namespace) -> int:
    # imported here: keeps hierax --help fast
    from hierax.geo import FitConfig, fit_prior, read_annotations, read_class_names

    config = FitConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        use_date=not args.no_date,
        species_per_step=args.species_per_step,
        pos_weight=args.pos_weight,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    names = read_class_names(args.model)
    records, summary = read_annotations(args.annotations, names, use_date=config.use_date)
    for line in summary.lines():
        print(line)
    prior = fit_prior(
        records,
        config,
        args.output,
        resume=args.resume,
        progress=not args.quiet,
        summary=summary.as_dict(),
        source_model=str(args.model),
    )
    print(f"prior: {args.output} ({len(prior.columns):,} species, final loss {prior.fit_summary['final_loss']:.4g})")
    return 0


def _info(args: argparse.Namespace) -> int:
    # imported here: keeps hierax --help fast
    from hierax.geo.model import describe_prior

    info = describe_prior(args.prior)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"{key:>20}: {value}")
    return 0


def _map(args: argparse.Namespace) -> int:
    # imported here: keeps hierax --help fast
    from hierax.data.metadata import Overrides
    from hierax.data.taxonomy import Taxonomy
    from hierax.geo import load_prior
    from hierax.geo.maps import draw_presence_map

    if args.resolution <= 0 or args.resolution > 30:
        raise HieraxError("--resolution must lie in (0, 30] degrees")
    date = Overrides.from_args(date=args.date).date if args.date else None
    prior = load_prior(args.prior)
    index = Taxonomy(prior.class_names, prior.common_names).index_of(args.species)
    if index is None:
        raise HieraxError(
            f"no species '{args.species}' in the prior; give a class name, a binomial or a common name "
            f"(e.g. '{prior.class_names[0]}')"
        )
    title = prior.class_names[index]
    if prior.common_names.get(index):
        title += f" ({prior.common_names[index]})"
    title += f", {date}" if date and prior.uses_date else ", any time of year" if prior.uses_date else ""
    draw_presence_map(prior, index, args.output, date=date, resolution=args.resolution, title=title)
    print(f"map: {args.output}")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"fit": _fit, "info": _info, "map": _map}[args.action](args)
