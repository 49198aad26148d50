"""Checkpoints, photos and a small world for the tests of predict and evaluate with a location prior and with
species of the user's own.

- `WORLD`: four iNat21-style species: a raven in Europe and one in Australia (all year), and two North American
  birds sharing one range, one seen only in summer and one only in winter. `write_world_annotations` writes
  records drawn from it as an iNat21-format annotation file (what `hierax geoprior fit` reads).
- `ambiguous_checkpoint`: a tiny HieraDet over those classes whose head ignores the image (zero weights) and
  slightly prefers the Australian raven (bias), so the image alone is unsure and the place must decide.
- `gps_photo`: copies of one real photo (scikit-image's chelsea) that differ only in their EXIF GPS and date.
- `trained_checkpoint`: the same ambiguous head on a backbone trained here for seconds to tell apart six real
  photos (scikit-image, scikit-learn), so that its embeddings separate them the way a big model's separate the
  many things it has seen; few-shot species and strangers then come from views of those photos.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from tests.similar_support import real_photos
from tests.test_data_metadata import _ascii, _rationals, exif_blob
from tests.test_geo_synthetic import Species, sample, write_annotations

NAMES = [
    "00000_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax",
    "00001_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_coronoides",
    "00002_Animalia_Chordata_Aves_Passeriformes_Hirundinidae_Hirundo_rustica",
    "00003_Animalia_Chordata_Aves_Passeriformes_Passerellidae_Junco_hyemalis",
]
SUMMER, WINTER = (5, 6, 7, 8), (11, 12, 1, 2)
_RANGES = [(50.0, 10.0, None), (-30.0, 145.0, None), (45.0, -100.0, SUMMER), (45.0, -100.0, WINTER)]
WORLD = [
    Species(i, name, name.split("_")[6], name.split("_")[7], lat, lon, 60.0, months, 1.0, i, i)
    for i, (name, (lat, lon, months)) in enumerate(zip(NAMES, _RANGES, strict=True))
]
IMAGE_ONLY = 1  # the class the ambiguous head prefers
HEAD_BIAS = (0.0, 0.4, 0.0, 0.0)
# Places and dates of the photos, with the species the prior should pick there.
PLACES = {
    "paris": (48.8566, 2.3522, dt.datetime(2021, 5, 10, 9, 30), 0),
    "sydney": (-33.8688, 151.2093, dt.datetime(2021, 3, 1, 17, 5), 1),
    "dakota_july": (44.08, -103.23, dt.datetime(2021, 7, 15, 6, 45), 2),
    "dakota_january": (44.08, -103.23, dt.datetime(2021, 1, 15, 12, 0), 3),
}
CONFIG = {"depths": [1, 1, 1, 1], "embed_dim": 16}
SIZE = 64


def write_world_annotations(path: Path, n: int = 800, seed: int = 1) -> Path:
    """`n` presence records of WORLD as an iNat21-format annotation file."""
    return write_annotations(path, WORLD, *sample(WORLD, n, seed=seed))


def write_world_dataset(root: Path, n: int = 40, unlocated: int = 4, seed: int = 7) -> Path:
    """An iNat21-format evaluation set under `root`: `n` records of WORLD whose photos are all copies of
    base_photo() (so only the place and date tell the species apart), plus `unlocated` copies without a
    location; returns the JSON."""
    root.mkdir(parents=True, exist_ok=True)
    path = write_annotations(root / "val.json", WORLD, *sample(WORLD, n, seed=seed))
    doc = json.loads(path.read_text())
    for k in range(unlocated):
        i = len(doc["images"])
        doc["images"].append({"id": i, "file_name": f"val/unlocated/{k}.jpg", "date": "2021-06-01"})
        doc["annotations"].append({"id": i, "image_id": i, "category_id": k % len(WORLD)})
    base = root / "photo.jpg"
    base_photo().save(base, "JPEG", quality=90)
    for image in doc["images"]:
        target = root / image["file_name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base, target)
    path.write_text(json.dumps(doc))
    return path


def _write(path: Path, net: torch.nn.Module) -> Path:
    from hierax.weights.files import ModelInfo, write_checkpoint

    with torch.no_grad():
        net.classifier.weight.zero_()
        net.classifier.bias.copy_(torch.tensor(HEAD_BIAS))
    info = ModelInfo.create("hieradet_d_tiny", {n: i for i, n in enumerate(NAMES)}, SIZE, config=CONFIG)
    return write_checkpoint(path, net.eval().state_dict(), info)


def ambiguous_checkpoint(path: Path, seed: int = 0) -> Path:
    """Random backbone, image-blind head over NAMES (see the module docstring)."""
    from hierax.models import create_model

    torch.manual_seed(seed)
    return _write(path, create_model("hieradet_d_tiny", len(NAMES), **CONFIG))


def photo_view(image: Image.Image, rng: np.random.Generator, side: int = 96) -> Image.Image:
    """A random crop (60-100% of each side), maybe mirrored, with brightness and colour jitter."""
    w, h = image.size
    scale = rng.uniform(0.6, 1.0)
    cw, ch = int(w * scale), int(h * scale)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    view = image.crop((x0, y0, x0 + cw, y0 + ch)).resize((side, side))
    if rng.random() < 0.5:
        view = ImageOps.mirror(view)
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Color(view).enhance(rng.uniform(0.7, 1.3))


def trained_checkpoint(path: Path, steps: int = 100, views: int = 8, seed: int = 0) -> Path:
    """A backbone trained to tell apart views of the six real photos, under the ambiguous head over NAMES."""
    from hierax.models import create_model
    from hierax.transforms import classification_transform

    photos = list(real_photos().values())
    rng = np.random.default_rng(seed)
    transform = classification_transform(SIZE)
    x = torch.stack([transform(photo_view(p, rng)) for p in photos for _ in range(views)])
    y = torch.arange(len(photos)).repeat_interleave(views)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network on a shared machine: one thread is faster
    try:
        torch.manual_seed(seed)
        net = create_model("hieradet_d_tiny", len(photos), **CONFIG)
        optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.05)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            batch = torch.randint(0, len(x), (32,), generator=generator)
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch], label_smoothing=0.1)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    net.classifier = torch.nn.Linear(net.embedding_size, len(NAMES))
    return _write(path, net)


def _dms(value: float) -> tuple[Fraction, Fraction, Fraction]:
    value = abs(value)
    degrees = int(value)
    minutes = int((value - degrees) * 60)
    seconds = Fraction(round((value - degrees - minutes / 60) * 3600, 2)).limit_denominator(100)
    return Fraction(degrees), Fraction(minutes), seconds


@functools.cache
def _chelsea() -> Image.Image:
    return real_photos()["chelsea"].resize((120, 80))


def base_photo() -> Image.Image:
    """The one real photo every copy is made of, at a small size (decoding stays cheap)."""
    return _chelsea().copy()


def gps_photo(
    path: Path, lat: float | None, lon: float | None, when: dt.datetime | None, image: Image.Image | None = None
) -> Path:
    """A JPEG of `image` (default base_photo()) with EXIF GPS (Pillow's rational degrees, minutes, seconds) and
    DateTimeOriginal; no EXIF at all when both are None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if lat is not None and lon is not None:
        exif[0x8825] = {1: "N" if lat >= 0 else "S", 2: _dms(lat), 3: "E" if lon >= 0 else "W", 4: _dms(lon)}
    if when is not None:
        exif[0x8769] = {0x9003: when.strftime("%Y:%m:%d %H:%M:%S")}
    (image or base_photo()).save(path, "JPEG", quality=90, **({"exif": exif} if len(exif) else {}))
    return path


def broken_gps_photo(path: Path) -> Path:
    """base_photo() whose GPS latitude has a zero denominator (a broken value), with a good date."""
    gps = {1: _ascii("N"), 2: _rationals((45, 1), (30, 0), (0, 1)), 3: _ascii("E"), 4: _rationals((10, 1), (0, 1))}
    path.parent.mkdir(parents=True, exist_ok=True)
    base_photo().save(path, "JPEG", quality=90, exif=exif_blob(gps, exif={0x9003: _ascii("2021:06:01 10:00:00")}))
    return path
