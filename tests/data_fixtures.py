"""Generated images, bad files and a small iNat21-layout dataset for the data / predict / evaluate tests."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = [
    "00000_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax",
    "00001_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corone",
    "00002_Animalia_Chordata_Aves_Passeriformes_Corvidae_Pica_pica",
    "00003_Plantae_Tracheophyta_Magnoliopsida_Fagales_Fagaceae_Quercus_robur",
]
COMMON_NAMES = ["Common Raven", "Carrion Crow", "Eurasian Magpie", "English Oak"]
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "tif": "TIFF", "gif": "GIF"}


def random_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A smooth random RGB image (width, height): gradients plus noise, so JPEG keeps it recognisable."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-3, 3, (3, 2))
    arr = np.stack([base[c] + slope[c, 0] * xx + slope[c, 1] * yy for c in range(3)], axis=-1)
    arr += rng.normal(0, 12, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    """Save a random image in the format given by the path's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = FORMATS[path.suffix.lower().lstrip(".")]
    random_image(seed, size).save(path, format=fmt)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_bad_files(folder: Path) -> dict[str, str]:
    """One file of each bad kind; returns path -> a word its error reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    bad: dict[str, str] = {}
    (folder / "zero.jpg").write_bytes(b"")
    bad[str(folder / "zero.jpg")] = "empty"
    full = folder / "full.jpg"
    write_image(full, 99, (64, 64))
    data = full.read_bytes()
    full.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    bad[str(folder / "truncated.jpg")] = "truncated"
    (folder / "notimage.png").write_text("this is a text file, not a picture\n" * 20)
    bad[str(folder / "notimage.png")] = "not an image"
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    (folder / "bomb.png").write_bytes(bomb)
    bad[str(folder / "bomb.png")] = "decompression bomb"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(folder / "tiny.png")
    bad[str(folder / "tiny.png")] = "too small"
    return bad


def make_inat_dataset(root: Path, per_class: int = 2, size: tuple[int, int] = (48, 40), split: str = "val") -> Path:
    """An iNat21-layout dataset: `<root>/<split>/<class>/<n>.jpg` plus `<root>/<split>.json`; returns the JSON."""
    images, annotations, categories = [], [], []
    for cid, (name, common) in enumerate(zip(CLASS_NAMES, COMMON_NAMES, strict=True)):
        parts = name.split("_")
        categories.append(
            {
                "id": cid,
                "name": f"{parts[6]} {parts[7]}",
                "common_name": common,
                "supercategory": parts[3],
                "kingdom": parts[1],
                "phylum": parts[2],
                "class": parts[3],
                "order": parts[4],
                "family": parts[5],
                "genus": parts[6],
                "specific_epithet": parts[7],
                "image_dir_name": name,
            }
        )
        for j in range(per_class):
            image_id = len(images)
            file_name = f"{split}/{name}/{j:04d}.jpg"
            write_image(root / file_name, seed=1000 * cid + j, size=size)
            images.append({"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": cid})
    doc = {"info": {}, "images": images, "annotations": annotations, "categories": categories, "licenses": []}
    json_path = root / f"{split}.json"
    json_path.write_text(json.dumps(doc))
    return json_path


TINY_CONFIG = {"depths": [1, 1, 1, 1], "embed_dim": 16}


def make_checkpoint(path: Path, size: int = 64, seed: int = 0, class_names: list[str] | None = None) -> Path:
    """A random-weight tiny hieradet_d_tiny checkpoint over `class_names` (default: the 4 iNat21 classes)."""
    import torch

    from hierax.models import create_model
    from hierax.weights.files import ModelInfo, write_checkpoint

    names = class_names or CLASS_NAMES
    torch.manual_seed(seed)
    net = create_model("hieradet_d_tiny", len(names), **TINY_CONFIG)
    with torch.no_grad():
        net.classifier.weight.mul_(400.0)  # spread the logits so that top-k orders are not near-ties
    info = ModelInfo.create("hieradet_d_tiny", {n: i for i, n in enumerate(names)}, size, config=TINY_CONFIG)
    return write_checkpoint(path, net.state_dict(), info)
