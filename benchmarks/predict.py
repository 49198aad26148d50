"""End-to-end `predict` throughput against model-only throughput on the same images, in one process.

Generates a folder of JPEGs (500 px long side, like iNat21), builds a random-weight network with an iNat21-sized
head, then measures:
- end to end: `hierax.inference.predict.predict` over the folder (decode + resize in DataLoader workers,
  forward, top-k rows, chunked CSV writer), wall time and images/s;
- model only: the same images decoded and transformed beforehand, then `infer_batch` over the same batches.
Prints the ratio and the peak RSS of the main process and of the largest worker. `--keep-freed-memory` first
applies `hierax.runtime.keep_freed_memory`, as the `hierax` command does; run it with and without to compare.

    python benchmarks/predict.py --images 200 --size 384 --batch-size 8 --workers 2

`--against-reference BIRDER_PYTHON` instead runs the `hierax predict` command against birder's predict script
(`python -m birder.scripts.predict`, from a throwaway venv whose python is given) on the same reference-layout
checkpoint (random weights, `--num-classes` head) and the same JPEGs, in alternating child processes, for every
`--sizes` x `--batch-sizes`: wall time of the whole command, the main process's peak RSS (VmHWM) and the peak of
the summed proportional set size (PSS: shared pages split among their sharers) of the process tree (main +
DataLoader workers), sampled every 0.2 s.

    python benchmarks/predict.py --against-reference /work/birder-venv/bin/python --sizes 224 384 \
        --batch-sizes 8 32 --images 200 --workers 2 --rounds 2
    python benchmarks/predict.py --against-reference ... --hierax-args=--amp \
        --reference-args="--amp --amp-dtype bfloat16"        # "=": the values start with dashes
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from children import run_measured


def make_jpegs(folder: Path, count: int, long_side: int) -> list[Path]:
    """Smooth random photos-like JPEGs, landscape and portrait, `long_side` px on the long side."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        w, h = (long_side, long_side * 3 // 4) if i % 2 == 0 else (long_side * 3 // 4, long_side)
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        noise = rng.normal(0, 8, (h, w, 3))
        arr = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        path = folder / f"img_{i:04d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory (MiB) of this process and of its largest finished child (a DataLoader worker)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, child


def cpu_seconds() -> tuple[float, float]:
    """User + system CPU seconds of this process and of its finished children (the DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


# ---- `hierax predict` against birder's predict script, in alternating child processes ----


def against_reference(args: argparse.Namespace) -> int:
    """The `hierax predict` command against birder's predict script: wall time and peak memory."""
    from hierax.models import create_model
    from hierax.weights.files import ModelInfo, write_checkpoint

    print(
        f"{args.network} ({args.num_classes} classes), {args.images} JPEGs of {args.long_side} px, "
        f"{args.workers} workers, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"{args.rounds} alternating rounds (best wall, largest memory)"
        + (f"; hierax {args.hierax_args!r}" if args.hierax_args else "")
        + (f"; birder {args.reference_args!r}" if args.reference_args else "")
    )
    env = dict(os.environ)
    birder_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # birder's venv sees no hierax
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        make_jpegs(root / "images", args.images, args.long_side)
        torch.manual_seed(0)
        net = create_model(args.network, args.num_classes)
        names = {f"{i:05d}_Genus{i // 3}_sp{i}": i for i in range(args.num_classes)}
        checkpoint = write_checkpoint(
            root / "models" / f"{args.network}_0.pt", net, ModelInfo.create(args.network, names, 224)
        )
        del net
        print(
            f"{'size':>4} {'batch':>5} {'hierax s':>8} {'birder s':>8} {'wall x':>6}  "
            f"{'main MiB h/b':>13} {'x':>5}  {'tree PSS h/b':>13} {'x':>5}  load"
        )
        for size in args.sizes:
            for batch in args.batch_sizes:
                common = ["--size", str(size), "--batch-size", str(batch)]
                commands = {
                    "hierax": [
                        sys.executable,
                        "-m",
                        "hierax",
                        "predict",
                        "--model",
                        str(checkpoint),
                        *common,
                        "--workers",
                        str(args.workers),
                        "--quiet",
                        "-o",
                        str(root / "out.csv"),
                        *shlex.split(args.hierax_args),
                        "images",
                    ],
                    "birder": [
                        args.against_reference,
                        "-m",
                        "birder.scripts.predict",
                        "-n",
                        args.network,
                        "-e",
                        "0",
                        *common,
                        "-j",
                        str(args.workers),
                        *shlex.split(args.reference_args),
                        "images",
                    ],
                }
                runs: dict[str, list[dict]] = {"hierax": [], "birder": []}
                for _ in range(args.rounds):
                    for name, cmd in commands.items():
                        runs[name].append(run_measured(cmd, root, env if name == "hierax" else birder_env))
                h_wall, b_wall = (min(r["wall"] for r in runs[n]) for n in runs)
                h_main, b_main = (max(r["main_mib"] for r in runs[n]) for n in runs)
                h_tree, b_tree = (max(r["tree_mib"] for r in runs[n]) for n in runs)
                ratios = statistics.median(h["wall"] / b["wall"] for h, b in zip(runs["hierax"], runs["birder"]))
                print(
                    f"{size:>4} {batch:>5} {h_wall:>8.1f} {b_wall:>8.1f} {ratios:>5.2f}x  "
                    f"{h_main:>6.0f}/{b_main:<6.0f} {h_main / b_main:>4.2f}x  "
                    f"{h_tree:>6.0f}/{b_tree:<6.0f} {h_tree / b_tree:>4.2f}x  {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--long-side", type=int, default=500)
    parser.add_argument("--network", default="hieradet_d_small")
    parser.add_argument("--num-classes", type=int, default=10000)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--keep-freed-memory", action="store_true", help="as the hierax command does (glibc)")
    parser.add_argument("--against-reference", metavar="BIRDER_PYTHON", help="the python of a venv with birder")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384], help="with --against-reference")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32], help="with --against-reference")
    parser.add_argument("--rounds", type=int, default=1, help="with --against-reference")
    parser.add_argument("--hierax-args", default="", help="with --against-reference: more options for hierax predict")
    parser.add_argument(
        "--reference-args", default="", help="with --against-reference: more options for birder's predict script"
    )
    args = parser.parse_args(argv)
    if args.against_reference:
        return against_reference(args)
    if args.keep_freed_memory:
        from hierax.runtime import keep_freed_memory

        print(f"keep_freed_memory applied: {keep_freed_memory()}")

    from hierax.data.images import decode_image
    from hierax.inference.classification import infer_batch
    from hierax.inference.predict import predict
    from hierax.models import create_model
    from hierax.transforms import classification_transform
    from hierax.weights.files import ModelInfo

    torch.manual_seed(0)
    net = create_model(args.network, args.num_classes).eval().requires_grad_(False).to(args.device)
    names = {f"{i:05d}_Animalia_Chordata_Aves_Order_Family_Genus{i // 3}_sp{i}": i for i in range(args.num_classes)}
    info = ModelInfo.create(args.network, names, args.size)
    transform = classification_transform(info.size, info.rgb_stats)
    print(
        f"{args.network} ({args.num_classes} classes) at {args.size}, batch {args.batch_size}, "
        f"{args.workers} workers, {args.images} JPEGs of {args.long_side} px, device {args.device}, "
        f"torch threads {torch.get_num_threads()}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = make_jpegs(folder, args.images, args.long_side)
        warm = transform(decode_image(paths[0]))[None].repeat(args.batch_size, 1, 1, 1)
        infer_batch(net, warm, amp=args.amp)

        cpu0 = cpu_seconds()
        start = time.perf_counter()
        summary = predict(
            [folder],
            (net, info),
            output=Path(tmp) / "out.csv",
            batch_size=args.batch_size,
            workers=args.workers,
            amp=args.amp,
            progress=False,
        )
        e2e_wall = time.perf_counter() - start
        cpu1 = cpu_seconds()
        own_rss, worker_rss = peak_rss_mb()
        assert summary.succeeded == args.images, summary.line()

        batches = [
            torch.stack([transform(decode_image(p)) for p in paths[i : i + args.batch_size]])
            for i in range(0, len(paths), args.batch_size)
        ]
        cpu2 = cpu_seconds()
        start = time.perf_counter()
        for batch in batches:
            infer_batch(net, batch, amp=args.amp)
        model_wall = time.perf_counter() - start
        model_cpu = cpu_seconds()[0] - cpu2[0]

    e2e_rate, model_rate = args.images / e2e_wall, args.images / model_wall
    print(f"end to end : {e2e_rate:7.2f} images/s  ({e2e_wall:.1f} s wall for {args.images} images)")
    print(f"model only : {model_rate:7.2f} images/s  ({model_wall:.1f} s)")
    print(f"ratio      : {e2e_rate / model_rate:.3f} (goal >= 0.95)")
    main_cpu, worker_cpu = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    print(
        f"CPU time   : end to end {(main_cpu + worker_cpu) / args.images:.3f} s/image (main {main_cpu:.1f} s + "
        f"workers {worker_cpu:.1f} s), model only {model_cpu / args.images:.3f} s/image; "
        f"ratio {model_cpu / (main_cpu + worker_cpu):.3f} (independent of other load on the machine)"
    )
    print(f"peak RSS   : main {own_rss:.0f} MiB during predict, largest worker {worker_rss:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
