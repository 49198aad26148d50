"""`hierax pretrain --data DIR --network NAME [--size] [--epochs N] [--batch-size N] [--output-dir DIR] [--resume]`:
DINOv2 self-supervised pretraining of a HieraDet backbone on unlabelled images.

A thin shell over `hierax.training.dino_v2.pretrain`. The result, OUTPUT_DIR/model.pt, is a backbone checkpoint
(reference .pt layout, no classifier) for `hierax train --init-from`; with --knn-data, OUTPUT_DIR/model-best.pt is
the backbone with the best k-NN top-1 (the starting weights included). Run under `torchrun --nproc-per-node N -m
hierax pretrain ...` for DDP."""

from __future__ import annotations

import argparse
from pathlib import Path

from hierax.cli._options import add_system_options, json_object, system_kwargs
from hierax.errors import HieraxError
from hierax.sizes import add_size_option, size_from

COMMAND = "pretrain"
HELP = "DINOv2 self-supervised pretraining of a backbone on unlabelled images"
DEFAULT_SIZE = 224


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and model")
    data.add_argument(
        "--data",
        required=True,
        help="images: a folder (searched recursively; class folders are fine, labels are ignored), "
        "a list or CSV file, a glob or an iNat21 .json",
    )
    data.add_argument("--network", default="hieradet_d_small", help="architecture (default hieradet_d_small)")
    data.add_argument(
        "--model-config",
        type=json_object,
        default={},
        help="HieraDet config overrides as JSON, e.g. '{\"drop_path_rate\": 0.2}'",
    )
    add_size_option(data, "global crop side (default 224); crops are square")
    data.add_argument("--local-size", type=int, help="local crop side (default: 96/224 of --size)")
    data.add_argument("--local-crops", type=int, default=8, help="local crops per image (default 8)")
    data.add_argument("--output-dir", type=Path, default=Path("runs/pretrain"), help="where model.pt and logs go")
    data.add_argument("--resume", action="store_true", help="continue the run in --output-dir exactly")
    data.add_argument(
        "--knn-data",
        help="labelled folder for a k-NN top-1 probe (leave-one-out) of the starting weights, then of the teacher "
        "and the student at each epoch end; the best backbone is kept in OUTPUT_DIR/model-best.pt",
    )
    data.add_argument("--knn-every", type=int, default=0, help="steps between k-NN probes (default: each epoch end)")
    data.add_argument(
        "--no-memory-check",
        action="store_true",
        help="start even when the estimated peak memory exceeds what is available",
    )

    method = parser.add_argument_group("method (DINOv2 defaults)")
    method.add_argument("--prototypes", type=int, default=65536, help="prototypes of each head (K)")
    method.add_argument("--head-hidden", type=int, default=2048, help="hidden width of the head MLPs")
    method.add_argument("--head-bottleneck", type=int, default=256, help="bottleneck width of the heads")
    method.add_argument(
        "--targets",
        choices=("sinkhorn", "centering"),
        default="sinkhorn",
        help="teacher targets: Sinkhorn-Knopp (3 iterations) or softmax centering",
    )
    method.add_argument("--koleo", type=float, default=0.1, help="KoLeo weight")
    method.add_argument("--ibot", type=float, default=1.0, help="iBOT loss weight")

    run_ = parser.add_argument_group("schedule")
    run_.add_argument("--epochs", type=int, default=100)
    run_.add_argument("--batch-size", type=int, default=64, help="per process and accumulation step")
    run_.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation steps")
    run_.add_argument("--lr", type=float, help="peak learning rate (default 0.004 x sqrt(global batch / 1024))")
    run_.add_argument(
        "--warmup-epochs",
        type=float,
        help="default: DINOv2's 10 epochs (at most 10%% of the run) or its 12,500 steps (at most half the run), "
        "whichever is longer",
    )

    add_system_options(parser, "student")


def _crop_side(value: list[str] | None) -> int:
    """The global crop side from --size: one number, or two equal ones (DINOv2's crops are square)."""
    h, w = size_from(value) or (DEFAULT_SIZE, DEFAULT_SIZE)
    if h != w:
        raise HieraxError(f"pretraining crops are square: give --size one number, not {h}x{w}")
    return h


def run(args: argparse.Namespace) -> int:
    # imported here: keeps hierax --help fast (no torch)
    from hierax.distributed import is_main_rank
    from hierax.training.dino_v2 import DinoConfig, pretrain

    if args.epochs < 1 or args.batch_size < 1:
        raise HieraxError("--epochs and --batch-size must be at least 1")
    size = _crop_side(args.size)
    config = DinoConfig(
        num_prototypes=args.prototypes,
        head_hidden_dim=args.head_hidden,
        head_bottleneck_dim=args.head_bottleneck,
        targets=args.targets,
        koleo_weight=args.koleo,
        ibot_weight=args.ibot,
        knn_path=args.knn_data,
        knn_every=args.knn_every,
    )
    options = system_kwargs(args)
    if args.warmup_epochs is not None:
        options["warmup_epochs"] = args.warmup_epochs
    history = pretrain(
        args.data,
        args.network,
        args.output_dir,
        size=size,
        local_size=args.local_size,
        local_crops=args.local_crops,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        config=config,
        network_config=args.model_config,
        memory_check=not args.no_memory_check,
        **options,
    )
    if is_main_rank():
        last = next((r for r in reversed(history) if r.get("split") == "train"), {})
        summary = f"backbone: {args.output_dir / 'model.pt'}"
        if last:
            summary += f" (dino loss {last['dino_loss']:.4f}, ibot loss {last['ibot_loss']:.4f})"
        probe = next((r for r in reversed(history) if r.get("knn_best") is not None), None)
        if probe:
            summary += (
                f"; k-NN top-1 start {probe['knn_start']:.4f}, last {probe['knn_top1']:.4f}, best "
                f"{probe['knn_best']:.4f}: {args.output_dir / 'model-best.pt'}"
            )
        print(summary)
    return 0
