"""Pretraining memory: the peak RSS of a few `hierax pretrain` steps against the estimate the run starts with.

Each configuration runs in its own child process (peak RSS only grows) on a folder of generated images: one epoch
of `--steps` steps, data loading in the process (no workers), so the peak is the training step's. Prints, per
batch size, the estimate (`hierax.training.dino_memory`), the measured peak, their ratio and seconds per step;
then the per-image slope, which extrapolates to larger batches.

    python benchmarks/pretrain.py [--network hieradet_d_tiny] [--size 224] [--local-size 96] [--local-crops 8]
        [--batches 1 2 4] [--steps 2] [--prototypes 65536] [--grad-checkpointing] [--device cpu]

Keep the batches small on a shared machine: the default recipe takes ~0.36 GB per image at 224 + 8 x 96.

`--against-reference BIRDER_PYTHON` instead runs the `hierax pretrain` command against birder's DINOv2 trainer
(`python -m birder.scripts.train_dino_v2`, from a throwaway venv whose python is given) in alternating child
processes, on one folder of photos (crops of scikit-image's coffee photo), with matching crops (2 global at
`--size`, `--local-crops` at `--local-size`), separate DINO and iBOT heads of `--prototypes` each, Sinkhorn-Knopp
targets, AdamW, `--workers` decoding processes each and bf16 autocast where this CPU has native bf16. Speed is the
median of the per-step images/s both log (the `--warmup` first steps left out); memory the main process's peak
RSS and the process tree's peak summed PSS (`children.run_measured`). One `--batches` value is used.

    python benchmarks/pretrain.py --against-reference /work/birder-venv/bin/python --network hieradet_d_tiny \
        --size 64 --local-size 32 --batches 8 --steps 6 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from children import compare_training


def child(args: argparse.Namespace) -> None:
    """One run; prints a JSON line with the estimate, the peak RSS and the time per step."""
    import torch

    from hierax.training import dino_v2

    torch.set_num_threads(args.threads)
    estimates = []
    check = dino_v2.check_run_memory

    def keep(*a, **k):
        estimates.append(check(*a, **k))
        return estimates[-1]

    dino_v2.check_run_memory = keep
    folder = Path(args.data)
    config = dino_v2.DinoConfig(num_prototypes=args.prototypes)
    tick = time.perf_counter()
    dino_v2.pretrain(
        folder,
        args.network,
        Path(args.out),
        size=args.size,
        local_size=args.local_size,
        local_crops=args.local_crops,
        epochs=1,
        batch_size=args.batch,
        config=config,
        num_workers=0,
        log_every=1,
        grad_checkpointing=args.grad_checkpointing,
        device=args.device,
    )
    seconds = (time.perf_counter() - tick) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.device and args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    estimate = estimates[0]
    print(json.dumps({"estimate": estimate.on(torch.device(args.device or "cpu")), "peak": peak, "s": seconds}))


def reference_commands(args: argparse.Namespace, batch: int, amp: bool) -> dict[str, list[str]]:
    """The two pretraining commands with matching crops, heads and optimiser, run in a folder holding images/."""
    common = ["--network", args.network, "--size", str(args.size), "--batch-size", str(batch), "--epochs", "1"]
    common += ["--device", "cpu"]
    hierax = [sys.executable, "-m", "hierax", "pretrain", "--data", "images", *common, "--output-dir", "hierax-run"]
    hierax += ["--local-size", str(args.local_size), "--local-crops", str(args.local_crops)]
    hierax += ["--prototypes", str(args.prototypes), "--targets", "sinkhorn", "--workers", str(args.workers)]
    hierax += ["--log-every", "1", "--amp" if amp else "--no-amp"]
    birder = [args.against_reference, "-m", "birder.scripts.train_dino_v2", *common, "--data-path", "images"]
    birder += ["--local-crop-size", str(args.local_size), str(args.local_size)]
    birder += ["--local-crops-number", str(args.local_crops), "--dino-out-dim", str(args.prototypes)]
    birder += ["--ibot-out-dim", str(args.prototypes), "--ibot-separate-head", "--centering", "sinkhorn_knopp"]
    birder += ["--opt", "adamw", "--lr", "1e-4", "--warmup-teacher-temp-epochs", "0", "-j", str(args.workers)]
    # birder freezes the prototypes for its first epoch by default, i.e. for all of a one-epoch run (no gradients,
    # no AdamW moments); hierax freezes them for its first 10% of steps, so birder trains them from the start
    birder += ["--freeze-last-layer-epochs", "0"]
    birder += ["--log-interval", "1"]
    birder += ["--non-interactive", "--no-summary", *(["--amp", "--amp-dtype", "bfloat16"] if amp else [])]
    return {"hierax": hierax, "birder": birder}


def against_reference(args: argparse.Namespace) -> None:
    """`hierax pretrain` against birder's DINOv2 trainer: images/s of the steps and peak memory."""
    import torch

    from hierax.models.fastpath import native_half_dtypes
    from train import make_photos

    batch = args.batches[0]
    amp = torch.bfloat16 in native_half_dtypes()
    print(
        f"{args.network}, 2 x {args.size} + {args.local_crops} x {args.local_size}, K={args.prototypes}, "
        f"batch {batch}, {args.warmup}+{args.steps} steps, {args.workers} workers, bf16 autocast {amp}, "
        f"{args.rounds} rounds"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_photos(root / "images", (args.warmup + args.steps) * batch, args.size)
        compare_training(
            reference_commands(args, batch, amp), root, root / "hierax-run" / "metrics.jsonl", args.warmup, args.rounds
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="hieradet_d_tiny")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device")
    parser.add_argument("--against-reference", metavar="BIRDER_PYTHON", help="time birder's DINOv2 trainer instead")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the speed against the reference")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes against the reference")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds against the reference")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        child(args)
        return
    if args.against_reference:
        against_reference(args)
        return
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images"
        data.mkdir()
        for i in range(max(args.batches) * args.steps):
            pixels = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(data / f"{i:04d}.png")
        rows = []
        print(f"{args.network}, {args.size} + {args.local_crops} x {args.local_size}, K={args.prototypes}", end="")
        print(", gradient checkpointing" if args.grad_checkpointing else "")
        print(f"{'batch':>5} {'estimate GB':>12} {'peak GB':>8} {'ratio':>6} {'s/step':>7}")
        for batch in args.batches:
            subset = Path(tmp) / f"b{batch}"
            subset.mkdir()
            for path in sorted(data.iterdir())[: batch * args.steps]:
                (subset / path.name).symlink_to(path)
            command = [sys.executable, __file__, "--child", "--batch", str(batch), "--data", str(subset)]
            command += ["--out", str(Path(tmp) / f"run{batch}")] + sys.argv[1:]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((batch, row))
            print(
                f"{batch:>5} {row['estimate'] / 2**30:>12.2f} {row['peak'] / 2**30:>8.2f} "
                f"{row['peak'] / row['estimate']:>6.2f} {row['s']:>7.1f}"
            )
        if len(rows) > 1:
            (b0, r0), (b1, r1) = rows[0], rows[-1]
            slope = (r1["peak"] - r0["peak"]) / (b1 - b0) / 2**30
            at32 = r1["peak"] / 2**30 + slope * (32 - b1)
            print(f"measured {slope:.3f} GB per image; batch 32 would peak near {at32:.1f} GB")


if __name__ == "__main__":
    main()
