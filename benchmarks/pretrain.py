"""Pretraining memory: the peak RSS of a few `hierax pretrain` steps against the estimate the run starts with.

Each configuration runs in its own child process (peak RSS only grows) on a folder of generated images: one epoch
of `--steps` steps, data loading in the process (no workers), so the peak is the training step's. Prints, per
batch size, the estimate (`hierax.training.dino_memory`), the measured peak, their ratio and seconds per step;
then the per-image slope, which extrapolates to larger batches.

    python benchmarks/pretrain.py [--network hieradet_d_tiny] [--size 224] [--local-size 96] [--local-crops 8]
        [--batches 1 2 4] [--steps 2] [--prototypes 65536] [--grad-checkpointing] [--device cpu]

Keep the batches small on a shared machine: the default recipe takes ~0.36 GB per image at 224 + 8 x 96."""

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
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        child(args)
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
