"""Classifying every detection box against classifying whole frames, on the same camera-trap-sized frames.

Generates 1920x1080 JPEGs with three boxes each (MegaDetector-style normalised boxes, 4-25% of the frame's
width), builds a random-weight network, then times, in alternating rounds (best round kept):
- whole frames: DataLoader(ImageDataset + classification_transform, collate_samples) -> infer_batch, as plain
  `hierax predict` runs: frames/s;
- crops: DataLoader(CropDataset: one decode per frame, every box cropped and transformed; batches of at most
  --batch-size crops) -> infer_batch, as `predict --detections` will: crops/s and frames/s;
- the loaders alone (decode + crop/resize in the workers, no model), to show where the time goes.

    python benchmarks/detections.py --frames 200 --network hieradet_d_small --size 224 --workers 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_frames(folder: Path, count: int, width: int, height: int) -> list[tuple[Path, list]]:
    """Smooth random JPEG frames and three random boxes each (normalised x, y, w, h)."""
    rng = np.random.default_rng(0)
    frames = []
    for i in range(count):
        small = rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        noise = rng.normal(0, 8, (height, width, 3))
        path = folder / f"frame_{i:04d}.jpg"
        Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)).save(
            path, quality=90
        )
        boxes = []
        for _ in range(3):
            w = rng.uniform(0.04, 0.25)
            h = min(w * width / height * rng.uniform(0.6, 1.4), 0.9)
            boxes.append((float(rng.uniform(0, 1 - w)), float(rng.uniform(0, 1 - h)), float(w), float(h)))
        frames.append((path, boxes))
    return frames


def timed(loader, net, infer_batch, amp: bool) -> tuple[float, int]:
    """Seconds for one pass over the loader (with the model when net is given) and the items classified."""
    start = time.perf_counter()
    items = 0
    for batch in loader:
        if batch["images"] is None:
            continue
        items += len(batch["images"])
        if net is not None:
            infer_batch(net, batch["images"], amp=amp)
    return time.perf_counter() - start, items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--network", default="hieradet_d_small")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16, help="frames per batch, and crops per batch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--crop", default="square:0.1:pad")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from torch.utils.data import DataLoader

    from hierax.data.boxes import FrameBoxes
    from hierax.data.crops import CropDataset, CropPolicy, fill_from_stats, make_crop_loader
    from hierax.data.datasets import ImageDataset, collate_samples
    from hierax.inference.classification import infer_batch
    from hierax.models import create_model
    from hierax.transforms import DEFAULT_RGB_STATS, classification_transform

    torch.manual_seed(0)
    net = create_model(args.network, args.num_classes).eval().requires_grad_(False).to(args.device)
    transform = classification_transform(args.size, DEFAULT_RGB_STATS)
    print(
        f"{args.network} ({args.num_classes} classes, random weights) at {args.size}, batch {args.batch_size}, "
        f"{args.workers} workers, {args.frames} frames of {args.width}x{args.height} with 3 boxes each, crop "
        f"{args.crop}, device {args.device}, torch threads {torch.get_num_threads()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        frames = make_frames(Path(tmp), args.frames, args.width, args.height)
        paths = [str(p) for p, _ in frames]
        boxes = [FrameBoxes(i, str(p), tuple(enumerate(b))) for i, (p, b) in enumerate(frames)]
        whole = DataLoader(
            ImageDataset(paths, transform),
            batch_size=args.batch_size,
            num_workers=args.workers,
            collate_fn=collate_samples,
        )
        crops = make_crop_loader(
            CropDataset(boxes, transform, CropPolicy.parse(args.crop), fill_from_stats(DEFAULT_RGB_STATS)),
            batch_size=args.batch_size,
            workers=args.workers,
        )
        infer_batch(net, torch.zeros(args.batch_size, 3, args.size, args.size), amp=args.amp)  # warm up
        best: dict[str, tuple[float, int]] = {}
        cases = {"whole": (whole, net), "crops": (crops, net), "whole data": (whole, None), "crops data": (crops, None)}
        for _ in range(args.rounds):
            for name, (loader, model) in cases.items():
                seconds, items = timed(loader, model, infer_batch, args.amp)
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, items)

    n = args.frames
    whole_s, crops_s = best["whole"][0], best["crops"][0]
    n_crops = best["crops"][1]
    print(f"whole frames : {n / whole_s:7.2f} frames/s  ({whole_s:.1f} s)")
    print(
        f"crops        : {n_crops / crops_s:7.2f} crops/s, {n / crops_s:.2f} frames/s "
        f"({crops_s:.1f} s, {n_crops} crops)"
    )
    print(f"ratio        : crops path {whole_s / crops_s:.2f}x the frames/s of whole frames")
    print(
        f"loaders only : whole {n / best['whole data'][0]:.1f} frames/s, crops {n / best['crops data'][0]:.1f} frames/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
