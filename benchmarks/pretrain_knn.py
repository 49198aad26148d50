"""Short DINOv2 runs on small real data (issue 19): do they end above the random-init k-NN?

The issue's setup: scikit-learn's digits (1,797 real 8 x 8 scans), upscaled bicubic to 64 px RGB, split with a
fixed seed into 1,437 unlabelled training images and 360 labelled held-out scans. Each run is
`hierax.training.dino_v2.pretrain` (as `hierax pretrain` calls it) with only the data, `--network`, `--size 64`,
`--epochs N` and `--batch-size 32` given, plus the held-out scans as its k-NN probe (`--knn-data`, probed every
`--probe-every` steps; the probes change no training setting). Each run is a child process (peak RSS only grows).

k-NN rule, as hierax's KnnProbe: leave-one-out within the 360 held-out scans, cosine similarity, votes weighted
exp(sim / 0.07). Reported with k = 10 (the issue's 10-NN) and k = 20 (the run's own probe, `KnnProbe`'s default),
for the network with random weights (the run's seed: the run's starting weights, and two other seeds), the run's
last backbone (model.pt, the teacher) and its best one (model-best.pt).

    OMP_NUM_THREADS=1 python benchmarks/pretrain_knn.py [--epochs 1 3 10] [--out DIR] [--threads 1]
    python benchmarks/pretrain_knn.py --summary --out DIR     # the tables of the runs in DIR (finished or not)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from hierax.atomic import atomic_write

NETWORK = "hieradet_d_tiny"
PROBE_LINE = re.compile(r"step (\d+): k-NN top-1 ([\d.]+) \(student ([\d.]+|nan);")


def write_json(path: Path, value: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=1)))


def write_digits(folder: Path, size: int, held_out: int, seed: int) -> tuple[Path, Path]:
    """All 1,797 digits as `size` px RGB PNG files: `held_out` of them (a seeded permutation) in class folders
    (the labelled probe set), the rest in one flat folder (the unlabelled training set)."""
    from sklearn.datasets import load_digits

    train, probe = folder / "unlabelled", folder / "labelled"
    if train.is_dir() and probe.is_dir():
        return train, probe
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    probe_ids = set(order[:held_out].tolist())
    train.mkdir(parents=True)
    for i, (scan, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        image = Image.fromarray((scan * (255 / 16)).astype(np.uint8), "L").resize((size, size), Image.BICUBIC)
        target = probe / f"digit{label}" if i in probe_ids else train
        target.mkdir(parents=True, exist_ok=True)
        atomic_write(target / f"{i:04d}.png", image.convert("RGB").save)
    return train, probe


def child(args: argparse.Namespace) -> None:
    """One run, then the k-NN of every backbone (`evaluate`); writes result.json in the run folder."""
    import torch

    from hierax.training.dino_v2 import DinoConfig, pretrain

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    train, probe_dir = Path(args.data) / "unlabelled", Path(args.data) / "labelled"
    config = DinoConfig(knn_path=str(probe_dir), knn_every=args.probe_every)
    tick = time.perf_counter()
    history = pretrain(
        train, NETWORK, run, size=args.size, epochs=args.run_epochs, batch_size=args.batch_size, config=config,
        seed=args.seed, log_every=1,
    )  # fmt: skip
    result = {
        "epochs": args.run_epochs,
        "steps": [r for r in history if r["split"] == "train"][-1]["step"],
        "wall_s": time.perf_counter() - tick,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "workers_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }
    write_json(run / "result.json", result)
    evaluate(run, Path(args.data), args.size, args.seed)


def evaluate(run: Path, data: Path, size: int, seed: int) -> None:
    """Add the k-NN of the random-init, last and best backbones to the run's result.json: leave-one-out on the
    held-out scans with k = 10 and 20 ("k10", "k20"), and 10-NN of the held-out scans against the training scans
    with their labels as the bank ("bank10", the labels are used by this probe only)."""
    import torch
    from sklearn.datasets import load_digits

    from hierax.data.datasets import ImageDataset
    from hierax.training.dino_monitor import KnnProbe, embed_images, knn_top1
    from hierax.training.dino_v2 import BEST_FILE, DinoConfig, build_student
    from hierax.transforms import classification_transform
    from hierax.weights.load import load_pretrained_model

    probe = KnnProbe(str(data / "labelled"), (size, size))
    train_paths = sorted(str(p) for p in (data / "unlabelled").iterdir())
    train_labels = torch.from_numpy(load_digits().target[[int(Path(p).stem) for p in train_paths]])
    train = ImageDataset(train_paths, transform=classification_transform((size, size)))

    def scores(backbone) -> dict[str, float]:
        feats, bank = embed_images(backbone, probe.dataset), embed_images(backbone, train)
        found = {f"k{k}": knn_top1(feats, probe.labels, k=k) for k in (10, 20)}
        return {**found, "bank10": knn_top1(bank, train_labels, feats, probe.labels, k=10)}

    knn = {}
    for s in (seed, seed + 1, seed + 2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)  # as DinoV2Stage builds the starting weights
            knn[f"random seed {s}"] = scores(build_student(NETWORK, DinoConfig()).backbone)
    for name in ("model.pt", BEST_FILE):
        knn[name] = scores(load_pretrained_model(run / name, progress=False)[0])
    result = json.loads((run / "result.json").read_text())
    write_json(run / "result.json", {**result, "knn": knn})


def trajectory(run: Path) -> list[dict]:
    """The k-NN probes along a run (step 0, every --probe-every steps, each epoch end) with the teacher's
    entropy, feature spread, momentum and LR of that step, from its metrics.jsonl and log."""
    records = (
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        if (run / "metrics.jsonl").exists()
        else []
    )
    train = {r["step"]: r for r in records if r["split"] == "train"}
    probes: dict[int, tuple[float, float]] = {}
    for r in records:
        if r["split"] == "val":
            probes.setdefault(0, (r["knn_start"], float("nan")))
            probes[r["step"]] = (r["knn_top1"], r.get("knn_student", float("nan")))
    log = run / "log.txt"
    for line in log.read_text().splitlines() if log.exists() else []:
        if "step 0 (the starting weights)" in line:
            probes[0] = (float(line.rsplit(" ", 1)[1]), float("nan"))
        elif m := PROBE_LINE.search(line):
            probes[int(m[1])] = (float(m[2]), float(m[3]))
    rows = []
    for step in sorted(probes):
        rec = train.get(step, {})
        rows.append(
            {
                "step": step,
                "teacher": probes[step][0],
                "student": probes[step][1],
                **{k: rec.get(k, float("nan")) for k in ("teacher_entropy", "feature_std", "momentum", "lr", "loss")},
            }
        )
    return rows


def seconds_per_step(run: Path, batch_size: int) -> float:
    """The median time of one step (log_every=1: one record a step; a probe's step is an outlier)."""
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    rates = [r["images_per_s"] for r in map(json.loads, lines) if r["split"] == "train"]
    return batch_size / statistics.median(rates) if rates else float("nan")


def summary(out: Path, batch_size: int) -> None:
    """Print the k-NN table of every run in `out` and each run's probes along the way (markdown)."""
    runs = sorted((p for p in out.glob("epochs-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    print(
        "| epochs | steps | random init, seeds 0/1/2: LOO 10-NN; bank 10-NN | step 0 (random, seed 0) | model.pt "
        "| model-best.pt | s/step | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        spent = seconds_per_step(run, batch_size)
        path = run / "result.json"
        if not path.exists():
            rows = trajectory(run)
            last = rows[-1] if rows else {}
            print(f"| {run.name.split('-')[1]} (unfinished) | {last.get('step', 0)} so far | | "
                  f"{rows[0]['teacher'] if rows else float('nan'):.3f} (20-NN) | teacher {last.get('teacher', 0):.3f} "
                  f"(20-NN, step {last.get('step', 0)}) | | {spent:.2f} | |")  # fmt: skip
            continue
        r = json.loads(path.read_text())
        knn = r["knn"]
        rand = [v for k, v in knn.items() if k.startswith("random")]
        cell = lambda v: f"{v['k10']:.3f} / {v['k20']:.3f} / {v.get('bank10', float('nan')):.3f}"  # noqa: E731
        randoms = " / ".join(f"{v['k10']:.3f}" for v in rand)
        banks = " / ".join(f"{v.get('bank10', float('nan')):.3f}" for v in rand)
        print(
            f"| {r['epochs']} | {r['steps']} | {randoms}; {banks} "
            f"| {cell(rand[0])} | {cell(knn['model.pt'])} | {cell(knn['model-best.pt'])} | {spent:.2f} "
            f"| {r['peak_rss'] / 2**30:.2f} GB (+ workers {r['workers_peak_rss'] / 2**30:.2f}) |"
        )
    print(
        "\n(cells: leave-one-out 10-NN / leave-one-out 20-NN (the run's own probe) on the 360 held-out scans / 10-NN "
        "of the held-out scans against the 1,437 training scans with their labels)"
    )
    for run in runs:
        print(f"\n{run.name}: the run's 20-NN probes (teacher, student), teacher entropy (of ln 65536 = 11.09), "
              "teacher feature spread, momentum, LR")  # fmt: skip
        print("| step | teacher | student | entropy | spread | momentum | lr |\n|---|---|---|---|---|---|---|")
        for row in trajectory(run):
            print(
                f"| {row['step']} | {row['teacher']:.3f} | {row['student']:.3f} | {row['teacher_entropy']:.3f} "
                f"| {row['feature_std']:.3f} | {row['momentum']:.4f} | {row['lr']:.2e} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--out", type=Path, default=Path("runs/pretrain-knn"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--held-out", type=int, default=360)
    parser.add_argument("--seed", type=int, default=0, help="the split's and the runs' seed")
    parser.add_argument("--probe-every", type=int, default=11, help="steps between the run's k-NN probes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout-min", type=float, default=45.0, help="per run; an unfinished run is summarised")
    parser.add_argument("--summary", action="store_true", help="only print the tables of the runs in --out")
    parser.add_argument("--evaluate", action="store_true", help="add the k-NN to finished runs in --out that lack it")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--run-epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        child(args)
        return
    if args.evaluate:
        for result in sorted(args.out.glob("epochs-*/result.json")):
            if "bank10" not in result.read_text():  # not yet with this script's k-NN
                evaluate(result.parent, args.out / "data", args.size, args.seed)
    elif not args.summary:
        data = args.out / "data"
        write_digits(data, args.size, args.held_out, args.seed)
        for epochs in args.epochs:
            run = args.out / f"epochs-{epochs}"
            run.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, __file__, "--child", "--run", str(run), "--run-epochs", str(epochs)]
            command += ["--data", str(data), *sys.argv[1:]]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
            with open(run / "log.txt", "w", encoding="utf-8") as log:
                try:
                    subprocess.run(command, stdout=log, stderr=log, env=env, timeout=args.timeout_min * 60, check=True)
                except subprocess.TimeoutExpired:
                    print(f"{run.name}: stopped after {args.timeout_min} minutes", file=sys.stderr)
    summary(args.out, args.batch_size)


if __name__ == "__main__":
    main()
