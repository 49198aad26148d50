"""Shared by the tests/test_serve*.py files: a tiny random-weight model with iNat21 class names, images, the real
server in a subprocess, photos with EXIF GPS and a hand-set location prior."""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from hierax.geo import GeoPrior, PresenceNet
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


# ---- the real server in a subprocess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of a process, MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class LiveServer:
    """`python -m hierax serve ARGS` on 127.0.0.1 at a free port, with its output in `log`."""

    url: str
    port: int
    log: Path
    proc: subprocess.Popen

    @classmethod
    @contextmanager
    def run(cls, args: list[str], log: Path) -> Iterator[LiveServer]:
        """Start it, wait until /healthz answers (at most 120 s), yield it, stop it."""
        port = free_port()
        cmd = [sys.executable, "-m", "hierax", "serve", *map(str, args), "--port", str(port), "--device", "cpu"]
        out = open(log, "w+")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HIERAX_OFFLINE": "1"})
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    out.seek(0)
                    pytest.fail(f"hierax serve exited with {proc.returncode}:\n{out.read()}")
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail("hierax serve did not answer /healthz within 120 s")
                time.sleep(0.3)
            yield cls(url, port, log, proc)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out.close()


# ---- photos with a place and a prior that knows places


def _dms(value: float) -> tuple[Fraction, Fraction, Fraction]:
    value = abs(value)
    degrees = int(value)
    minutes = int((value - degrees) * 60)
    seconds = Fraction(round((value - degrees - minutes / 60) * 3600, 2)).limit_denominator(100)
    return Fraction(degrees), Fraction(minutes), seconds


def gps_jpeg(lat: float, lon: float, when: str = "2023:07:14 09:30:05") -> bytes:
    """chelsea as JPEG with EXIF GPS (rationals, hemisphere references) and DateTimeOriginal."""
    from skimage import data

    exif = Image.Exif()
    exif[0x8825] = {1: "N" if lat >= 0 else "S", 2: _dms(lat), 3: "E" if lon >= 0 else "W", 4: _dms(lon)}
    exif[0x8769] = {0x9003: when}
    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


NORTH, SOUTH, SUMMER = 0, 1, 4  # the classes hemisphere_prior places: Felis catus, Lynx rufus, Corvus corax


def hemisphere_prior(class_names: list[str] = CLASS_NAMES) -> GeoPrior:
    """A hand-set prior: class NORTH lives north of the equator, SOUTH south of it, SUMMER everywhere from May
    to September (northern summer); every other class nowhere (presence ~0.0025: floored by combine).

    Features: [sin lon, cos lon, sin(pi lat/90), cos(pi lat/90), sin(2 pi d), cos(2 pi d)]; hidden units:
    relu(sin lat'), relu(-sin lat'), relu(-cos 2 pi d), 0; no residual blocks."""
    net = PresenceNet(6, len(class_names), hidden=4, blocks=0)
    with torch.no_grad():
        net.stem.weight.zero_()
        net.stem.bias.zero_()
        net.stem.weight[0, 2], net.stem.weight[1, 2], net.stem.weight[2, 5] = 1.0, -1.0, -1.0
        net.head.weight.zero_()
        net.head.bias.fill_(-6.0)
        for cls, unit in ((NORTH, 0), (SOUTH, 1), (SUMMER, 2)):
            net.head.weight[cls, unit] = 12.0
    return GeoPrior(net, list(class_names), np.arange(len(class_names)), uses_date=True)


# ---- photos for an index and species of the user's own


def write_photos(root: Path, count: int = 3) -> dict[str, list[str]]:
    """The variants (crop, mirror, colour shift, small crop) of `count` real photos as JPEGs: name -> paths."""
    from tests.similar_support import real_photos, variants

    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[str]] = {}
    for name, image in list(real_photos().items())[:count]:
        out[name] = []
        for j, variant in enumerate(variants(image)):
            path = root / f"{name}_{j}.jpg"
            variant.save(path, quality=85)
            out[name].append(str(path))
    return out
