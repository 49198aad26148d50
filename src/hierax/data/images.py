"""Decode one image into an RGB uint8 tensor (3, H, W): torchvision first, Pillow as the fallback.

Every failure becomes an ImageDecodeError whose message names the reason (empty, truncated, not an image,
decompression bomb, too small), so batch jobs can record it and carry on.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from hierax.errors import ImageDecodeError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
MAX_PIXELS = 89_478_485
MIN_SIDE = 8
_TORCHVISION_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})

ImageSource = str | Path | bytes


def read_bytes(source: ImageSource) -> bytes:
    """The raw bytes of a path or of bytes already in memory; ImageDecodeError when it cannot be read."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(f"file not found: {source}", "not_found") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"is a directory, not an image: {source}") from None
    except OSError as err:
        raise ImageDecodeError(f"cannot read {source}: {err.strerror or err}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of a PIL image in any mode (L, P, RGBA, CMYK, I;16, ...), with EXIF orientation applied."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(image, dtype=np.float32)
        if arr.max(initial=0) > 255:
            arr = arr / 257.0
        image = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def _check_size(width: int, height: int, max_pixels: int, min_side: int) -> None:
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"decompression bomb: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}",
            "decompression_bomb",
        )
    if min(width, height) < min_side:
        raise ImageDecodeError(
            f"image too small: {width}x{height} (each side must be at least {min_side} px)", "too_small"
        )


def _looks_complete(data: bytes, fmt: str) -> bool:
    """Cheap end-of-stream check for the fast path; suspicious files go to Pillow, which detects truncation."""
    if fmt == "JPEG":
        return data.rstrip(b"\x00\r\n")[-2:] == b"\xff\xd9"
    if fmt == "PNG":
        return b"IEND" in data[-64:]
    return True


def decode_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> torch.Tensor:
    """Decode a path or encoded bytes to an RGB uint8 tensor (3, H, W), EXIF orientation applied.

    Raises ImageDecodeError for empty, unreadable, truncated, oversized (decompression bomb) or tiny images.
    GIFs give their first frame."""
    data = read_bytes(source)
    if not data:
        raise ImageDecodeError("empty file (0 bytes)", "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            header = Image.open(io.BytesIO(data))
            fmt, (width, height) = header.format, header.size
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"decompression bomb: {err}", "decompression_bomb") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)", "not_an_image") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"corrupt image header: {err}", "not_an_image") from None
    _check_size(width, height, max_pixels, min_side)
    if fmt in _TORCHVISION_FORMATS and _looks_complete(data, fmt):
        try:
            return _decode_torchvision(data)
        except RuntimeError:
            pass
    return _decode_pillow(data)


def _decode_torchvision(data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        image = tv_decode(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    if image.dtype != torch.uint8:
        raise RuntimeError("non-8-bit image: decode with Pillow")
    if image.ndim == 4:
        image = image[0]
    return image


_TRUNCATION_FLAG = threading.Lock()


@contextlib.contextmanager
def _refuse_truncated_images() -> Iterator[None]:
    """Hold Pillow's process-wide LOAD_TRUNCATED_IMAGES off while hierax decodes: other libraries set it on import
    (MegaDetector's visualisation module does), and with it a cut-off file decodes as if it were whole."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _TRUNCATION_FLAG:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = True


def _decode_pillow(data: bytes) -> torch.Tensor:
    try:
        with warnings.catch_warnings(), _refuse_truncated_images():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.seek(0)
                image.load()
                rgb = to_rgb(image)
    except OSError as err:
        if "truncated" in str(err).lower():
            raise ImageDecodeError("truncated image", "truncated") from None
        raise ImageDecodeError(f"cannot decode image: {err}") from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"cannot decode image: {err}") from None
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def load_image(image: ImageSource | Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Any supported input (path, bytes, PIL image, HWC/HW array, CHW uint8 tensor) as RGB uint8 (3, H, W)."""
    if isinstance(image, str | Path | bytes | bytearray | memoryview):
        return decode_image(image)
    if isinstance(image, Image.Image):
        rgb = to_rgb(image)
        return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ImageDecodeError(f"array of shape {image.shape} is not an HxW, HxWx3 or HxWx4 image")
        if image.dtype != np.uint8:
            scale = 255.0 if image.max(initial=0) <= 1.0 else 1.0
            image = np.clip(image.astype(np.float32) * scale, 0, 255).round().astype(np.uint8)
        image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]
        return torch.from_numpy(np.array(image, dtype=np.uint8, order="C")).permute(2, 0, 1).contiguous()
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ImageDecodeError(f"tensor of shape {tuple(image.shape)} is not a (3, H, W) or (1, H, W) image")
        return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image
    raise ImageDecodeError(f"unsupported image input of type {type(image).__name__}")
