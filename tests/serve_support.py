"""Shared by the tests/test_serve*.py files: a tiny random-weight model with iNat21 class names, and images."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import torch
from PIL import Image

from hierax.models import create_model
from hierax.weights.files import ModelInfo

CLASS_NAMES = [
    "00000_Animalia_Chordata_Mammalia_Carnivora_Felidae_Felis_catus",
    "00001_Animalia_Chordata_Mammalia_Carnivora_Felidae_Lynx_rufus",
    "00002_Animalia_Chordata_Mammalia_Carnivora_Felidae_Panthera_leo",
    "00003_Animalia_Chordata_Mammalia_Carnivora_Canidae_Canis_latrans",
    "00004_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax",
    "00005_Plantae_Tracheophyta_Magnoliopsida_Fagales_Fagaceae_Quercus_alba",
    "00006_Plantae_Tracheophyta_Magnoliopsida_Fagales_Fagaceae_Quercus_rubra",
    "00007_Fungi_Basidiomycota_Agaricomycetes_Agaricales_Amanitaceae_Amanita_muscaria",
]
COMMON_NAMES = {
    0: "Domestic Cat",
    1: "Bobcat",
    2: "Lion",
    3: "Coyote",
    4: "Common Raven",
    5: "White Oak",
    6: "Northern Red Oak",
    7: "Fly Agaric",
}
TINY_CONFIG = {"depths": [1, 1, 1, 1], "embed_dim": 16}


def tiny_model(
    size: int = 32, class_names: list[str] = CLASS_NAMES, seed: int = 0
) -> tuple[torch.nn.Module, ModelInfo]:
    """A random-weight hieradet_d_tiny (one block per stage, width 16) and its ModelInfo."""
    torch.manual_seed(seed)
    net = create_model("hieradet_d_tiny", len(class_names), **TINY_CONFIG).eval()
    info = ModelInfo.create("hieradet_d_tiny", {n: i for i, n in enumerate(class_names)}, size, config=TINY_CONFIG)
    return net, info


def encode(array: np.ndarray, fmt: str = "JPEG", **options) -> bytes:
    """An HxWx3 uint8 array encoded as `fmt` bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **options)
    return buf.getvalue()


def chelsea_jpeg() -> bytes:
    """scikit-image's photo of Chelsea the cat, as JPEG bytes."""
    from skimage import data

    return encode(data.chelsea(), "JPEG", quality=90)


def bomb_png(side: int = 30_000) -> bytes:
    """A tiny PNG whose header declares side x side pixels: a decompression bomb by declaration."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body
