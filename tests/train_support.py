"""Labelled image sets for the training tests: generated coloured shapes, and scikit-learn's real digit scans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from sklearn.datasets import load_digits

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40))


def draw_shape(
    shape: str, size: int, rng: np.random.Generator, colour: tuple[int, int, int] | None = None
) -> Image.Image:
    """One `shape` at a random scale and position on a noisy grey background, in `colour` (jittered) or a random
    colour."""
    bg = rng.integers(60, 200) * np.ones(3)
    noise = rng.normal(0, 12, (size, size, 3))
    image = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    base = np.array(colour) + rng.integers(-30, 31, 3) if colour is not None else rng.integers(0, 256, 3)
    fg = tuple(int(v) for v in np.clip(base, 0, 255))
    r = size * rng.uniform(0.22, 0.36)
    cx, cy = (size * rng.uniform(0.35, 0.65) for _ in range(2))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    else:
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    return image


def make_shapes(
    root: Path, per_class: int, size: int = 32, seed: int = 0, classes: int = 4, colour_coded: bool = True
) -> Path:
    """Write `per_class` PNGs of each of the first `classes` shapes into root/<shape>/; returns root. With
    colour_coded each class also has its own (jittered) colour, which a tiny network learns in a few steps."""
    rng = np.random.default_rng(seed)
    for shape, colour in zip(SHAPES[:classes], COLOURS, strict=False):
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(shape, size, rng, colour if colour_coded else None).save(folder / f"{shape}_{i:04d}.png")
    return root


def add_bad_images(folder: Path) -> list[Path]:
    """Add an empty .jpg and a truncated .png to `folder`; returns their paths."""
    empty = folder / "zz_empty.jpg"
    empty.write_bytes(b"")
    good = next(folder.glob("*.png")).read_bytes()
    truncated = folder / "zz_truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    return [empty, truncated]


def make_digits(
    root: Path,
    size: int = 32,
    classes: tuple[int, ...] = tuple(range(10)),
    per_class: int | None = None,
    val_share: float = 0.2,
    seed: int = 0,
) -> tuple[Path, Path]:
    """scikit-learn's handwritten digits (1,797 real 8x8 grey scans, UCI), upscaled to `size` px RGB PNGs in class
    folders root/train/<digit>/ and root/val/<digit>/, split `val_share` per class with a fixed seed; at most
    `per_class` images of each class. Returns (train, val)."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for digit in classes:
        indices = rng.permutation(np.flatnonzero(digits.target == digit))[:per_class]
        n_val = round(val_share * len(indices))
        for split, part in (("val", indices[:n_val]), ("train", indices[n_val:])):
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                grey = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8))
                grey.resize((size, size), Image.Resampling.BICUBIC).convert("RGB").save(folder / f"{i:04d}.png")
    return root / "train", root / "val"
