"""Fitting a geo prior at iNat21 scale: seconds per epoch for 2.7 M records and 10,000 species, and the file size.

Records are generated (species centres uniform on the globe, 150-390 records each scattered around them, dates
uniform over the year), so no data set is needed. A full epoch at this scale takes many minutes on a laptop
CPU, so each contender runs a few optimizer steps per round; seconds per epoch are the best round's time per
step times the steps of an epoch (extrapolated, and said so in the output). Contenders, interleaved round by
round in this process:
  - sampled: the default loss, every species in the batch plus `--species-per-step` (2048) others sampled;
  - full: the exact assume-negative-full loss over all 10,000 species (`--species-per-step all`).
It also times reading an iNat21-format annotation file (a smaller generated one, extrapolated per million
records) and writes one prior to report its size.

    python benchmarks/geoprior.py [--records 2686843] [--species 10000] [--steps 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hierax.geo import FitConfig, Records, read_annotations
from hierax.geo.fit import PriorFitter


def generate(records: int, species: int, seed: int = 0) -> Records:
    rng = np.random.default_rng(seed)
    counts = rng.integers(150, 390, size=species).astype(np.float64)
    labels = rng.choice(species, size=records, p=counts / counts.sum())
    centre_lat = np.degrees(np.arcsin(rng.uniform(-1, 1, size=species)))
    centre_lon = rng.uniform(-180, 180, size=species)
    lat = np.clip(centre_lat[labels] + rng.normal(0, 6, size=records), -90, 90)
    lon = (centre_lon[labels] + rng.normal(0, 9, size=records) + 180) % 360 - 180
    day = rng.uniform(0, 1, size=records)
    names = [f"{i:05d}_Animalia_Chordata_Aves_O_F_Genus{i}_species{i}" for i in range(species)]
    return Records(lat.astype(np.float32), lon.astype(np.float32), day.astype(np.float32), labels, names)


def time_steps(fitter: PriorFitter, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fitter.train_step()
    return (time.perf_counter() - start) / steps


def annotation_read_seconds_per_million(records: Records, n: int, folder: Path) -> float:
    """Write n records as an iNat21-format file and time read_annotations on it."""
    cats = [{"id": i, "image_dir_name": name} for i, name in enumerate(records.class_names)]
    images = [
        {"id": i, "latitude": float(records.lat[i]), "longitude": float(records.lon[i]), "date": "2019-06-01 10:00:00"}
        for i in range(n)
    ]
    anns = [{"id": i, "image_id": i, "category_id": int(records.label[i])} for i in range(n)]
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    start = time.perf_counter()
    read_annotations(path, records.class_names)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2_686_843)
    parser.add_argument("--species", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--species-per-step", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--read-records", type=int, default=200_000, help="size of the annotation file timed")
    args = parser.parse_args()

    records = generate(args.records, args.species)
    contenders = {
        "sampled": PriorFitter(records, FitConfig(batch_size=args.batch_size, species_per_step=args.species_per_step)),
        "full": PriorFitter(records, FitConfig(batch_size=args.batch_size, species_per_step=None)),
    }
    for fitter in contenders.values():
        fitter.train_step()  # warm-up: allocations, oneDNN/MKL kernel choice
    best = {name: float("inf") for name in contenders}
    for _ in range(args.rounds):
        for name, fitter in contenders.items():
            best[name] = min(best[name], time_steps(fitter, args.steps))
    steps_per_epoch = contenders["full"].steps_per_epoch
    threads, load = torch.get_num_threads(), os.getloadavg()[0]
    print(f"{args.records:,} records, {args.species:,} species, batch {args.batch_size}, {threads} threads")
    print(f"load average at the end: {load:.1f} (other processes on this machine)")
    print(f"{steps_per_epoch} steps per epoch; seconds per epoch extrapolated from {args.steps} steps x {args.rounds}")
    for name, seconds in best.items():
        print(f"  {name:>8}: {seconds:.3f} s/step, {seconds * steps_per_epoch / 60:.1f} min/epoch")
    print(f"  full / sampled: {best['full'] / best['sampled']:.2f}x")

    with tempfile.TemporaryDirectory() as tmp:
        path = contenders["sampled"].prior().save(Path(tmp) / "prior.safetensors")
        print(f"prior file: {path.stat().st_size / 2**20:.1f} MiB ({len(contenders['sampled'].columns):,} outputs)")
        per_million = annotation_read_seconds_per_million(records, args.read_records, Path(tmp))
        print(f"reading annotations: {per_million:.1f} s per million records (timed on {args.read_records:,})")


if __name__ == "__main__":
    main()
