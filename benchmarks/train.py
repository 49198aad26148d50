"""Training throughput: the `hierax train` pipeline against a plain loop, in the same process.

The baseline is forward + cross entropy + backward + AdamW on one pre-made batch already in memory (under the
same autocast). The pipeline is the fine-tuning stage on the shared engine: JPEG decoding, random resized crop,
TrivialAugment and random erasing in DataLoader workers, MixUp/CutMix, label smoothing, layer-decay groups,
schedules, gradient clipping, EMA and the metrics log. Both use hieradet_d_small at 256, batch 16 by default.

    python benchmarks/train.py [--steps 6] [--warmup 2] [--size 256] [--batch-size 16] [--workers N] [--device]

Prints images/s and peak memory for each and their ratio. Peak memory is CUDA's max allocated on a GPU and the
process's peak RSS on CPU (monotonic, so the pipeline, measured second, includes the baseline's).

`--against-reference BIRDER_PYTHON` instead runs the `hierax train` command against birder's train script
(`python -m birder.scripts.train`, from a throwaway venv whose python is given) in alternating child processes, on
the same photos (validating on a small set after each epoch) with the same recipe: AdamW (lr 1e-4, weight decay
0.05), TrivialAugment (wide), random erasing 0.25, MixUp 0.8 + CutMix on every batch, label smoothing 0.1, gradient
clipping at 1, EMA every step, no layer decay, bf16 autocast where this CPU has native bf16 (fp32 elsewhere),
`--workers` decoding processes each.
Speed is the median of the per-step images/s that both log (every step; the `--warmup` first steps left out),
memory the main process's peak RSS and the process tree's peak summed PSS (`children.run_measured`). `--epochs N`
runs N epochs of those steps: the whole-run wall time then counts what happens at each epoch end.

    python benchmarks/train.py --against-reference /work/birder-venv/bin/python --steps 8 --warmup 2 --rounds 2
    python benchmarks/train.py --against-reference /work/birder-venv/bin/python --steps 4 --warmup 1 --epochs 3
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from children import compare_training
from hierax.data.datasets import load_labelled
from hierax.distributed import init_distributed, seed_everything
from hierax.models import create_model
from hierax.training.engine import Engine, TrainConfig
from hierax.training.supervised import FineTuneConfig, SupervisedStage

NUM_CLASSES = 10


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def baseline(args: argparse.Namespace, device: torch.device, amp: bool) -> tuple[float, float]:
    """Images/s and peak memory of the plain loop."""
    reset_peak(device)
    net = create_model("hieradet_d_small", NUM_CLASSES).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.05)
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    tick = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            tick = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = args.steps * args.batch_size / (time.perf_counter() - tick)
    del net, opt
    return rate, peak_memory_mib(device)


def make_photos(root: Path, count: int, size: int) -> None:
    """`count` JPEG photos (random crops of scikit-image's coffee photo, tinted) in NUM_CLASSES class folders."""
    source = skdata.coffee()
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class_{i % NUM_CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        y, x = rng.integers(0, source.shape[0] - 256), rng.integers(0, source.shape[1] - 256)
        crop = source[y : y + 256, x : x + 256].astype(np.float32) * rng.uniform(0.7, 1.2, 3)
        image = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((size * 5 // 4, size * 5 // 4))
        image.save(folder / f"{i:05d}.jpg", quality=90)


def pipeline(args: argparse.Namespace, dist, amp: bool, workdir: Path) -> tuple[float, float]:
    """Images/s (after the warmup steps) and peak memory of the fine-tuning pipeline."""
    reset_peak(dist.device)
    total = args.warmup + args.steps
    data_dir = workdir / "data"
    make_photos(data_dir, total * args.batch_size, args.size)
    train = load_labelled(data_dir)
    options = FineTuneConfig(data=str(data_dir), network="hieradet_d_small", size=(args.size, args.size), mix_prob=1.0)
    config = TrainConfig(
        output_dir=workdir / "run",
        epochs=1,
        batch_size=args.batch_size,
        lr=1e-4,
        num_workers=args.workers,
        log_every=args.warmup,
        amp=amp,
        device=args.device,
    )
    seed_everything(0)
    stage = SupervisedStage(options, train, None, config.epochs)
    history = Engine(stage, config, dist).fit()
    timed = [r for r in history if r["split"] == "train" and r["step"] > args.warmup]
    seconds = sum(
        (r["step"] - p["step"]) * args.batch_size / r["images_per_s"]
        for p, r in zip([{"step": args.warmup}, *timed], timed)
    )
    return args.steps * args.batch_size / seconds, peak_memory_mib(dist.device)


def reference_commands(args: argparse.Namespace, amp: bool) -> dict[str, list[str]]:
    """The two commands with one recipe (see the module docstring), run in a folder holding train/ and val/."""
    common = ["--network", "hieradet_d_small", "--size", str(args.size), "--batch-size", str(args.batch_size)]
    common += ["--epochs", str(args.epochs), "--lr", "1e-4", "--device", "cpu"]
    hierax = [sys.executable, "-m", "hierax", "train", "--data", "train", "--val", "val", *common]
    hierax += ["--output-dir", "hierax-run"]
    hierax += ["--weight-decay", "0.05", "--layer-decay", "1", "--clip-grad", "1", "--augment", "trivialaugment"]
    hierax += ["--augment-strength", "1", "--random-erasing", "0.25", "--mixup", "0.8", "--cutmix", "1"]
    hierax += ["--mix-prob", "1", "--label-smoothing", "0.1", "--workers", str(args.workers), "--log-every", "1"]
    hierax += ["--amp" if amp else "--no-amp"]
    birder = [args.against_reference, "-m", "birder.scripts.train", *common, "--opt", "adamw", "--wd", "0.05"]
    birder += ["--clip-grad-norm", "1", "--aug-type", "ta_wide", "--re-prob", "0.25", "--mixup-alpha", "0.8"]
    birder += ["--cutmix", "--smoothing-alpha", "0.1", "--model-ema", "--model-ema-steps", "1"]
    birder += ["-j", str(args.workers), "--log-interval", "1", "--data-path", "train", "--val-path", "val"]
    birder += ["--non-interactive", "--no-summary", *(["--amp", "--amp-dtype", "bfloat16"] if amp else [])]
    return {"hierax": hierax, "birder": birder}


def against_reference(args: argparse.Namespace) -> None:
    """`hierax train` against birder's train script: images/s of the training steps and peak memory."""
    from hierax.models.fastpath import native_half_dtypes

    amp = torch.bfloat16 in native_half_dtypes()
    print(
        f"hieradet_d_small at {args.size}, batch {args.batch_size}, {args.warmup}+{args.steps} steps, "
        f"{args.epochs} epoch(s) validated on {NUM_CLASSES} images, "
        f"{args.workers} workers, bf16 autocast {amp}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"{args.rounds} alternating rounds"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_photos(root / "train", (args.warmup + args.steps) * args.batch_size, args.size)
        make_photos(root / "val", NUM_CLASSES, args.size)
        metrics = root / "hierax-run" / "metrics.jsonl"
        compare_training(reference_commands(args, amp), root, metrics, args.warmup, args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, help="data loader workers (default: min(4, CPU count))")
    parser.add_argument("--device", default=None)
    parser.add_argument("--against-reference", metavar="BIRDER_PYTHON", help="time birder's train script instead")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds against the reference")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of each run against the reference")
    args = parser.parse_args()
    if args.against_reference:
        args.workers = 2 if args.workers is None else args.workers
        against_reference(args)
        return
    logging.basicConfig(level=logging.WARNING)
    dist = init_distributed(args.device)
    amp = dist.device.type == "cuda"
    base_rate, base_mem = baseline(args, dist.device, amp)
    with tempfile.TemporaryDirectory() as tmp:
        pipe_rate, pipe_mem = pipeline(args, dist, amp, Path(tmp))
    print(
        f"device {dist.device}, hieradet_d_small at {args.size}, batch {args.batch_size}, bf16 autocast {amp}, "
        f"{args.steps} timed steps after {args.warmup}"
    )
    print(f"baseline loop : {base_rate:8.1f} images/s, peak memory {base_mem:8.0f} MiB")
    print(f"hierax train  : {pipe_rate:8.1f} images/s, peak memory {pipe_mem:8.0f} MiB")
    print(f"ratio (pipeline / baseline): speed {pipe_rate / base_rate:.2f}x, memory {pipe_mem / base_mem:.2f}x")


if __name__ == "__main__":
    main()
