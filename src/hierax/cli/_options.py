"""Options shared by subcommands: the model options of predict / embed / evaluate, and the system options of
train / pretrain. Torch-free: every subcommand imports this when the parser is built."""

from __future__ import annotations

import argparse
import json

from hierax.sizes import add_size_option, size_from
from hierax.weights.catalog import DEFAULT_MODEL

WORKERS_HELP = "decoding processes (default: min(4, CPUs, shared among the ranks of a machine))"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --size, --batch-size, --workers, --device, --amp, --tta, --quiet, --backend."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name or checkpoint path ({DEFAULT_MODEL})")
    add_size_option(parser, "input size (default: the model's)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="images per batch (16); on CPU the forward takes a few of them at a time, as many as its activations "
        "allow, so a large batch costs little memory",
    )
    parser.add_argument("--workers", type=int, help=WORKERS_HELP)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: this rank's GPU if any, else CPU)")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation: 5 crops, averaged")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--backend",
        choices=("torch", "inductor", "onnxruntime", "torchscript"),
        default="torch",
        help="runtime (default torch). inductor: torch.compile, weights frozen on CPU; compiles on the first batch "
        "(about 45 s for hieradet_d_small on 2 CPU cores), one graph per run (a last partial batch is padded), "
        "pays on runs of thousands of photos; on AVX-512 CPUs only with --amp (in fp32 it is slower there than "
        "torch). onnxruntime, torchscript: run an exported file, exporting a "
        "checkpoint once into the cache",
    )


def model_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of predict / embed / evaluate from the shared options; HieraxError for a bad --size
    (checked here, before anything loads)."""
    return {
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": args.device,
        "amp": args.amp,
        "tta": args.tta,
        "size": size_from(args.size),
        "progress": not args.quiet,
        "backend": args.backend,
    }


def add_geo_options(parser: argparse.ArgumentParser) -> None:
    """The "where and when" group of predict and evaluate: --geo-prior, --location, --date."""
    geo = parser.add_argument_group(
        "where and when",
        "re-weight species by where and when each photo was taken: --location/--date, else the input CSV's "
        "latitude, longitude and date columns, else the photo's EXIF GPS and DateTimeOriginal",
    )
    geo.add_argument("--geo-prior", metavar="PRIOR", help="a location prior (hierax geoprior fit) for this model")
    geo.add_argument(
        "--location",
        nargs=2,
        type=float,
        metavar=("LAT", "LON"),
        help="where every photo was taken, in decimal degrees (overrides CSV columns and EXIF)",
    )
    geo.add_argument("--date", metavar="YYYY-MM-DD", help="when every photo was taken (overrides CSV and EXIF)")


def geo_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of predict / evaluate from the "where and when" group."""
    return {"geo_prior": args.geo_prior, "location": args.location, "date": args.date}


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got '{text}'") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {value:g}")
    return value


def add_system_options(parser: argparse.ArgumentParser, compiled: str) -> None:
    """The "system" group of train and pretrain: device, precision, compile, workers, seed, logging."""
    system = parser.add_argument_group("system")
    system.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when available)")
    precision = system.add_mutually_exclusive_group()
    precision.add_argument(
        "--amp", action="store_true", help="bf16 autocast on the CPU too (pays where bf16 is native: AVX-512 BF16, AMX)"
    )
    precision.add_argument("--no-amp", action="store_true", help="no bf16 autocast (it is on by default on CUDA)")
    system.add_argument("--compile", action="store_true", help=f"torch.compile the {compiled}")
    system.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    system.add_argument("--workers", type=int, help=WORKERS_HELP)
    system.add_argument("--seed", type=int, default=0)
    system.add_argument("--log-every", type=int, default=20, help="steps between metric records")
    system.add_argument(
        "--checkpoint-every",
        type=int,
        default=1000,
        help="save the training state every N steps as well as at each epoch end (0: epoch ends)",
    )


def system_kwargs(args: argparse.Namespace) -> dict:
    """TrainConfig keyword arguments from the system options, plus --accum-steps and --resume."""
    # imported here: keeps hierax --help fast (this runs inside train's and pretrain's run())
    from hierax.data.datasets import default_workers

    return {
        "accum_steps": args.accum_steps,
        "amp": True if args.amp else False if args.no_amp else None,
        "compile": args.compile,
        "grad_checkpointing": args.grad_checkpointing,
        "num_workers": default_workers() if args.workers is None else args.workers,
        "seed": args.seed,
        "log_every": args.log_every,
        "checkpoint_every": args.checkpoint_every,
        "resume": args.resume,
        "device": args.device,
    }


def json_object(text: str) -> dict:
    """argparse type of --model-config: a JSON object of HieraDet config overrides."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_open_set_arguments(parser: argparse.ArgumentParser) -> None:
    """The "species of your own" group of predict and serve: few-shot species in the ranking, and "unknown" for a
    low best score."""
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
