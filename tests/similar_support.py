"""Photos and backbones for the similar-photo and few-shot tests.

- `photo_variants`: real photos (scikit-image, scikit-learn) and Tux Paint stamps, each with a crop, a flip, a
  colour shift and a small off-centre crop, saved as JPEGs.
- `stamp_view`: a Tux Paint cut-out, randomly cropped, flipped, pasted on a random plain background and
  colour-jittered: one "photo" of that species.
- `train_backbone`: a tiny HieraDet trained in the test (about 150 steps, one thread, seconds) to tell apart the
  views of 64 base stamps; the few-shot tests use species it never saw. Random weights cannot do that here: on
  these views they score at chance, since the random background colour dominates them.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

STAMPS = "/usr/share/tuxpaint/stamps/animals"
BACKBONE_CONFIG = {"depths": [1, 1, 1, 1], "embed_dim": 16}
SIZE = 64


def stamp_paths() -> list[str]:
    """Animal stamps (one species each), sorted; the test is skipped where Tux Paint's stamps are missing."""
    paths = sorted(glob.glob(os.path.join(STAMPS, "*", "*.png")))
    if len(paths) < 40:
        pytest.skip("Tux Paint stamps are not installed (apt-get install tuxpaint-stamps-default)")
    return paths


def on_background(stamp: Image.Image, colour: tuple[int, int, int], margin: float = 0.15) -> Image.Image:
    """An RGBA cut-out pasted in the middle of a plain square of `colour`."""
    w, h = stamp.size
    side = int(max(w, h) * (1 + margin))
    canvas = Image.new("RGBA", (side, side), (*colour, 255))
    canvas.alpha_composite(stamp, ((side - w) // 2, (side - h) // 2))
    return canvas.convert("RGB")


def stamp_view(path: str, rng: np.random.Generator) -> Image.Image:
    """One augmented "photo" of a stamp (see the module docstring)."""
    stamp = Image.open(path).convert("RGBA")
    stamp.thumbnail((128, 128))
    w, h = stamp.size
    scale = rng.uniform(0.7, 1.0)
    cw, ch = max(int(w * scale), 8), max(int(h * scale), 8)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    stamp = stamp.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        stamp = ImageOps.mirror(stamp)
    image = on_background(stamp, tuple(int(v) for v in rng.integers(60, 240, 3)))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))


def variants(image: Image.Image) -> list[Image.Image]:
    """The image, a central 80% crop, a mirror image, a brighter and paler copy, and an off-centre 85% crop at
    half size."""
    w, h = image.size
    x0, y0 = int(w * 0.12), int(h * 0.05)
    return [
        image,
        image.crop((int(w * 0.1), int(h * 0.1), int(w * 0.9), int(h * 0.9))),
        ImageOps.mirror(image),
        ImageEnhance.Color(ImageEnhance.Brightness(image).enhance(1.25)).enhance(0.6),
        image.crop((x0, y0, x0 + int(w * 0.85), y0 + int(h * 0.85))).resize((w // 2, h // 2)),
    ]


def real_photos() -> dict[str, Image.Image]:
    """The offline real photos: scikit-image's chelsea, coffee, astronaut, rocket; scikit-learn's flower, china."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_image

    arrays = {
        "chelsea": skdata.chelsea(),
        "coffee": skdata.coffee(),
        "astronaut": skdata.astronaut(),
        "rocket": skdata.rocket(),
        "flower": load_sample_image("flower.jpg"),
        "china": load_sample_image("china.jpg"),
    }
    return {name: Image.fromarray(array) for name, array in arrays.items()}


def photo_variants(root: Path, stamps: int = 8) -> tuple[list[str], np.ndarray]:
    """JPEG paths of the real photos and `stamps` mammal stamps (on grey) with their variants, and for each
    path the index of the photo it came from."""
    sources = real_photos()
    for path in sorted(glob.glob(os.path.join(STAMPS, "mammals", "*.png")))[:stamps]:
        sources[Path(path).stem] = on_background(Image.open(path).convert("RGBA"), (200, 200, 190))
    root.mkdir(parents=True, exist_ok=True)
    paths, groups = [], []
    for group, (name, image) in enumerate(sources.items()):
        for j, variant in enumerate(variants(image)):
            path = root / f"{name}_{j}.jpg"
            variant.save(path, quality=85)
            paths.append(str(path))
            groups.append(group)
    return paths, np.array(groups)


def split_species(seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """Stamps split into (8 few-shot species, 4 species kept unknown, the rest for training the backbone)."""
    paths = stamp_paths()
    order = np.random.default_rng(seed).permutation(len(paths))
    chosen = [paths[i] for i in order]
    return chosen[:8], chosen[8:12], chosen[12:]


def train_backbone(path: Path, base: list[str], *, steps: int = 150, views: int = 8, seed: int = 0) -> Path:
    """Train a tiny HieraDet to classify views of the `base` stamps and write it as a checkpoint at `path`."""
    from hierax.models import create_model
    from hierax.transforms import classification_transform
    from hierax.weights.files import ModelInfo, write_checkpoint

    rng = np.random.default_rng(seed)
    transform = classification_transform(SIZE)
    x = torch.stack([transform(stamp_view(p, rng)) for p in base for _ in range(views)])
    y = torch.arange(len(base)).repeat_interleave(views)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network on a shared machine: one thread is several times faster than two
    try:
        torch.manual_seed(seed)
        net = create_model("hieradet_d_tiny", len(base), **BACKBONE_CONFIG)
        optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.05)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            batch = torch.randint(0, len(x), (32,), generator=generator)
            images = x[batch]
            flip = torch.rand(len(batch), generator=generator) < 0.5
            images[flip] = images[flip].flip(-1)
            loss = torch.nn.functional.cross_entropy(net(images), y[batch], label_smoothing=0.1)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    names = {f"base_{Path(p).stem}": i for i, p in enumerate(base)}
    info = ModelInfo.create("hieradet_d_tiny", names, SIZE, config=BACKBONE_CONFIG)
    return write_checkpoint(path, net.eval().state_dict(), info)


def write_views(root: Path, species: list[str], count: int, seed: int) -> dict[str, list[str]]:
    """`count` views of each stamp as JPEGs under root/<species name>/; species name -> paths."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {}
    for path in species:
        name = Path(path).stem
        (root / name).mkdir(parents=True, exist_ok=True)
        out[name] = []
        for j in range(count):
            target = root / name / f"{j:02d}.jpg"
            stamp_view(path, rng).save(target, quality=90)
            out[name].append(str(target))
    return out
