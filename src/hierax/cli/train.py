"""`hierax train --data TRAIN [--val VAL] --network NAME [--init-from NAME|PATH] ...`: fine-tune a classifier.

A thin shell over `hierax.training.supervised.train_classifier`. Run under `torchrun --nproc-per-node N -m hierax
train ...` for DDP. Progressive resolution: a second run with `--init-from RUN/model.pt --size 384`."""

from __future__ import annotations

import argparse
from pathlib import Path

from hierax.cli._options import add_system_options, json_object, system_kwargs
from hierax.sizes import add_size_option, size_from

COMMAND = "train"
HELP = "fine-tune (or train from scratch) a species classifier on labelled photos"
DEFAULT_SIZE = (256, 256)
AUGMENT_CHOICES = ("trivialaugment", "randaugment", "none")  # checked again by the library (augment.AUGMENTS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and model")
    data.add_argument("--data", required=True, help="training set: class folders, an iNat21 .json or a path,label .csv")
    data.add_argument("--val", help="validation set (same layouts); top-1/top-5 after every epoch")
    data.add_argument("--data-root", help="folder that .json/.csv image paths are relative to (default: the file's)")
    data.add_argument("--network", help="architecture (default: the --init-from model's, else hieradet_d_small)")
    data.add_argument("--init-from", help="registry name, checkpoint, or SAM 2 / timm file to start from")
    data.add_argument(
        "--model-config",
        type=json_object,
        default={},
        help="HieraDet config overrides as JSON, e.g. '{\"drop_path_rate\": 0.2}'",
    )
    add_size_option(data, "training size (default 256)")
    data.add_argument("--output-dir", type=Path, default=Path("runs/train"), help="where model.pt and logs go")
    data.add_argument("--resume", action="store_true", help="continue the run in --output-dir exactly")

    run_ = parser.add_argument_group("schedule")
    run_.add_argument("--epochs", type=int, default=10)
    run_.add_argument("--batch-size", type=int, default=32, help="per process and accumulation step")
    run_.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation steps")
    run_.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW)")
    run_.add_argument("--min-lr-ratio", type=float, default=0.01, help="final LR as a share of --lr")
    run_.add_argument("--weight-decay", type=float, default=0.05)
    run_.add_argument("--layer-decay", type=float, help="layer-wise LR decay (default 0.65 with --init-from, else 1)")
    run_.add_argument(
        "--warmup-epochs", type=float, help="default: 5%% of the run, at least 100 steps (at most 20%% of the run)"
    )
    run_.add_argument("--clip-grad", type=float, default=1.0, help="gradient norm clip (0: off)")
    run_.add_argument("--no-ema", action="store_true", help="save the raw weights instead of their EMA")
    run_.add_argument("--ema-decay", type=float, help="default: a time constant of 2%% of the run")
    run_.add_argument("--linear-probe", action="store_true", help="train the classifier only (frozen body)")

    aug = parser.add_argument_group("augmentation and loss")
    aug.add_argument("--augment", choices=AUGMENT_CHOICES, default="trivialaugment")
    aug.add_argument("--label-smoothing", type=float, default=0.1)
    aug.add_argument("--mixup", type=float, default=0.8, help="MixUp alpha (0: off)")
    aug.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0: off)")
    aug.add_argument(
        "--augment-strength",
        type=float,
        help="0 to 1: scales crop, policy and erasing together (default: grows with --epochs, "
        "0 up to 5 epochs, 1 from 100)",
    )
    aug.add_argument("--mix-prob", type=float, help="share of mixed batches (default: 0 up to 20 epochs, 1 from 100)")
    aug.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        help="random horizontal flips (default: on whenever the augmentation strength is above 0; --no-hflip for "
        "digits, text and subjects whose sides differ)",
    )
    aug.add_argument("--random-erasing", type=float, help="random erasing probability (default: 0.25 x strength)")
    aug.add_argument(
        "--min-crop", type=float, help="smallest random-resized-crop area share (default: 1 - 0.92 x strength)"
    )

    add_system_options(parser, "model")


def run(args: argparse.Namespace) -> int:
    # imported here: keeps hierax --help fast (no torch)
    from hierax.distributed import is_main_rank
    from hierax.training.engine import TrainConfig
    from hierax.training.supervised import FineTuneConfig, train_classifier

    options = FineTuneConfig(
        data=args.data,
        val=args.val,
        data_root=args.data_root,
        network=args.network,
        init_from=args.init_from,
        size=size_from(args.size) or DEFAULT_SIZE,
        model_config=args.model_config,
        label_smoothing=args.label_smoothing,
        mixup=args.mixup,
        cutmix=args.cutmix,
        mix_prob=args.mix_prob,
        augment=args.augment,
        augment_strength=args.augment_strength,
        min_crop=args.min_crop,
        random_erasing=args.random_erasing,
        hflip=args.hflip,
        linear_probe=args.linear_probe,
    )
    config = TrainConfig(
        output_dir=args.output_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        layer_decay=args.layer_decay,
        warmup_epochs=args.warmup_epochs,
        clip_grad=args.clip_grad or None,
        ema=not args.no_ema,
        ema_decay=args.ema_decay,
        **system_kwargs(args),
    )
    result = train_classifier(options, config)
    val = [r for r in result.history if r.get("split") == "val"]
    summary = f"model: {result.model_path}"
    if val:
        summary += f" (val top-1 {val[-1]['top1']:.4f}, top-5 {val[-1]['top5']:.4f})"
    if is_main_rank():
        print(summary)
    return 0
