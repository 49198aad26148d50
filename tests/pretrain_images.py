"""Small image sets for the pretraining tests: real photos shipped with scikit-image / scikit-learn cut into many
random crops and colour variants, generated textures, and a held-out labelled texture set whose classes differ in
pattern only (colours are random), so colour alone cannot solve it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

TEXTURE_CLASSES = ("stripes", "checks", "dots", "rings")


def _photos() -> list[np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_image

    return [
        data.chelsea(),
        data.coffee(),
        data.astronaut(),
        load_sample_image("flower.jpg"),
        load_sample_image("china.jpg"),
    ]


def texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) uint8 pattern of `kind` with random frequency, angle, phase and two random colours."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    freq = rng.uniform(3, 6)
    phase = rng.uniform(0, 1)
    if kind == "stripes":
        pattern = np.sin(2 * math.pi * (freq * u + phase)) > 0
    elif kind == "checks":
        pattern = (np.floor(freq * u + phase) + np.floor(freq * v + phase)) % 2 == 0
    elif kind == "dots":
        cu, cv = (freq * u + phase) % 1 - 0.5, (freq * v + phase) % 1 - 0.5
        pattern = cu**2 + cv**2 < 0.08
    elif kind == "rings":
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        pattern = np.sin(2 * math.pi * freq * np.hypot(xx - cx, yy - cy) * 1.5 + phase) > 0
    else:
        raise ValueError(kind)
    fg, bg = rng.integers(0, 256, size=(2, 3))
    while np.abs(fg - bg).sum() < 150:
        fg, bg = rng.integers(0, 256, size=(2, 3))
    image = np.where(pattern[..., None], fg, bg).astype(np.float32)
    image += rng.normal(0, 8, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _photo_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (25-80% of the short side) of `photo` with a random colour cast, resized to `size`."""
    h, w = photo.shape[:2]
    side = int(rng.uniform(0.25, 0.8) * min(h, w))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = photo[top : top + side, left : left + side].astype(np.float32)
    crop = crop * rng.uniform(0.6, 1.3, size=3) + rng.uniform(-30, 30)
    image = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(image)


def make_unlabelled(folder: Path, photo_crops: int = 64, textures: int = 64, size: int = 80, seed: int = 0) -> Path:
    """Random crops (with colour variants) of the package photos plus generated textures, as PNG files in nested
    folders; returns `folder`."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    (folder / "photos" / "crops").mkdir(parents=True, exist_ok=True)
    (folder / "textures").mkdir(parents=True, exist_ok=True)
    for i in range(photo_crops):
        image = _photo_crop(photos[i % len(photos)], size, rng)
        Image.fromarray(image).save(folder / "photos" / "crops" / f"photo_{i:04d}.png")
    for i in range(textures):
        kind = TEXTURE_CLASSES[i % len(TEXTURE_CLASSES)]
        Image.fromarray(texture(kind, size, rng)).save(folder / "textures" / f"texture_{i:04d}.png")
    return folder


def make_labelled_textures(per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size, 3) uint8 textures and their class labels (index into TEXTURE_CLASSES)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, kind in enumerate(TEXTURE_CLASSES):
        for _ in range(per_class):
            images.append(texture(kind, size, rng))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def make_labelled_photo_crops(per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size, 3) uint8 random crops with colour casts of each package photo, labelled by photo."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, photo in enumerate(_photos()):
        for _ in range(per_class):
            images.append(_photo_crop(photo, size, rng))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def write_digits(folder: Path, unlabelled: int, labelled_per_class: int, size: int = 64) -> tuple[Path, Path]:
    """scikit-learn's handwritten digits (8 x 8 grayscale scans) upscaled to `size` px RGB PNG files: the first
    `unlabelled` in one folder, then `labelled_per_class` of each digit in class folders (a k-NN probe set).
    Returns (unlabelled folder, labelled folder)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pool, labelled = folder / "unlabelled", folder / "labelled"
    pool.mkdir(parents=True, exist_ok=True)
    taken = dict.fromkeys(range(10), 0)
    for i, (scan, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        image = Image.fromarray((scan * (255 / 16)).astype(np.uint8), "L").resize((size, size), Image.BICUBIC)
        if i < unlabelled:
            image.convert("RGB").save(pool / f"{i:04d}.png")
        elif taken[int(label)] < labelled_per_class:
            (labelled / f"digit{label}").mkdir(parents=True, exist_ok=True)
            image.convert("RGB").save(labelled / f"digit{label}" / f"{i:04d}.png")
            taken[int(label)] += 1
    return pool, labelled
