"""Options shared by subcommands: the model options of predict / embed / evaluate, and the system options of
train / pretrain."""

from __future__ import annotations

import argparse
import json

from hierax.errors import HieraxError
from hierax.weights.catalog import DEFAULT_MODEL


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --size, --batch-size, --workers, --device, --amp, --tta, --quiet, --backend."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name or checkpoint path ({DEFAULT_MODEL})")
    parser.add_argument("--size", type=int, nargs="+", metavar=("H", "W"), help="input size (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (16)")
    parser.add_argument("--workers", type=int, help="decoding processes (default: min(4, CPU count))")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: this rank's GPU if any, else CPU)")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation: 5 crops, averaged")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--backend",
        choices=("torch", "onnxruntime", "torchscript"),
        default="torch",
        help="runtime (default torch); others run an exported file, exporting a checkpoint once into the cache",
    )


def size_of(args: argparse.Namespace) -> tuple[int, int] | None:
    """The --size value as (H, W): one number means a square."""
    if not args.size:
        return None
    if len(args.size) > 2:
        raise HieraxError("--size takes H or H W")
    return (args.size[0], args.size[-1])


def model_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of predict / embed / evaluate from the shared options."""
    return {
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": args.device,
        "amp": args.amp,
        "tta": args.tta,
        "size": size_of(args),
        "progress": not args.quiet,
        "backend": args.backend,
    }


def add_system_options(parser: argparse.ArgumentParser, compiled: str) -> None:
    """The "system" group of train and pretrain: device, precision, compile, workers, seed, logging."""
    system = parser.add_argument_group("system")
    system.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when available)")
    system.add_argument("--no-amp", action="store_true", help="no bf16 autocast (it is on by default on CUDA)")
    system.add_argument("--compile", action="store_true", help=f"torch.compile the {compiled}")
    system.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    system.add_argument("--workers", type=int, help="data loader worker processes (default: min(4, CPU count))")
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
    return {
        "accum_steps": args.accum_steps,
        "amp": False if args.no_amp else None,
        "compile": args.compile,
        "grad_checkpointing": args.grad_checkpointing,
        "num_workers": args.workers,
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
