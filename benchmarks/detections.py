"""`predict --detections` against plain `predict` on the same camera-trap-sized frames, end to end.

Generates 1920x1080 JPEGs with three MegaDetector-style boxes each (4-25% of the frame's width) and their
MegaDetector file, builds a random-weight network over iNat21-style class names, then times, in alternating
rounds (best round kept), the library functions as the command runs them, each writing its CSV output:
- plain: `hierax.inference.predict.predict` on the whole frames (decode + resize in the workers, forward, rows,
  writer): frames/s;
- detections: `hierax.inference.detections.predict_detections` (one decode per frame, every box cropped and
  transformed and the EXIF header read in the workers, batches of at most --batch-size crops, forward, rows,
  writer, then the image summary and the events table): crops/s and frames/s.
Model loading is outside both timings (RunSummary.seconds).

    python benchmarks/detections.py --frames 200 --network hieradet_d_small --size 224 --workers 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_frames(folder: Path, count: int, width: int, height: int) -> Path:
    """Smooth random JPEG frames, three random boxes each, and the MegaDetector file naming them."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        small = rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        noise = rng.normal(0, 8, (height, width, 3))
        name = f"frame_{i:04d}.jpg"
        pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name, quality=90)
        boxes = []
        for _ in range(3):
            w = rng.uniform(0.04, 0.25)
            h = min(w * width / height * rng.uniform(0.6, 1.4), 0.9)
            bbox = [float(rng.uniform(0, 1 - w)), float(rng.uniform(0, 1 - h)), float(w), float(h)]
            boxes.append({"category": "1", "conf": 0.9, "bbox": bbox})
        images.append({"file": name, "detections": boxes})
    doc = {"info": {"format_version": "1.4"}, "detection_categories": {"1": "animal"}, "images": images}
    md = folder / "md.json"
    md.write_text(json.dumps(doc))
    return md


def class_names(n: int) -> list[str]:
    """iNat21-style names, so that the rows carry a taxonomy as a real model's do."""
    return [
        f"{i:05d}_Animalia_Chordata_Mammalia_Order{i % 12}_Family{i % 60}_Genus{i % 300}_species{i}" for i in range(n)
    ]


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

    from hierax.inference.classification import infer_batch
    from hierax.inference.detections import predict_detections
    from hierax.inference.predict import predict
    from hierax.models import create_model
    from hierax.weights.files import ModelInfo

    torch.manual_seed(0)
    names = class_names(args.num_classes)
    net = create_model(args.network, len(names)).eval().requires_grad_(False).to(args.device)
    info = ModelInfo.create(args.network, {n: i for i, n in enumerate(names)}, args.size)
    print(
        f"{args.network} ({args.num_classes} classes, random weights) at {args.size}, batch {args.batch_size}, "
        f"{args.workers} workers, {args.frames} frames of {args.width}x{args.height} with 3 boxes each, crop "
        f"{args.crop}, device {args.device}, torch threads {torch.get_num_threads()}"
    )
    common = dict(batch_size=args.batch_size, workers=args.workers, amp=args.amp, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        md = make_frames(folder, args.frames, args.width, args.height)
        paths = sorted(str(p) for p in folder.glob("*.jpg"))
        infer_batch(net, torch.zeros(args.batch_size, 3, args.size, args.size), amp=args.amp)  # warm up
        best: dict[str, object] = {}
        for _ in range(args.rounds):
            runs = {
                "plain": lambda: predict(paths, (net, info), output=folder / "plain.csv", **common),
                "detections": lambda: predict_detections(
                    folder, md, (net, info), output=folder / "boxes.csv", crop=args.crop, **common
                ),
            }
            for name, run in runs.items():
                summary = run()
                if name not in best or summary.seconds < best[name].seconds:
                    best[name] = summary

    plain, det = best["plain"], best["detections"]
    print(f"plain predict   : {plain.images_per_s:7.2f} frames/s  ({plain.seconds:.1f} s)")
    print(
        f"--detections    : {det.crops_per_s:7.2f} crops/s, {det.images_per_s:.2f} frames/s "
        f"({det.seconds:.1f} s, {det.crops} crops)"
    )
    print(f"ratio           : --detections {det.images_per_s / plain.images_per_s:.2f}x the frames/s of plain predict")
    print(f"                  a crop costs {plain.images_per_s / det.crops_per_s:.2f}x a whole frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
