"""Inference preprocessing, as the reference does it: resize to exactly (H, W) with bicubic antialiasing, center
crop (a no-op at crop ratio 1.0), scale to [0, 1] and normalise with the checkpoint's rgb_stats."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

from hierax.data.images import to_rgb

DEFAULT_RGB_STATS: dict[str, list[float]] = {"mean": [0.5191, 0.5306, 0.4877], "std": [0.2316, 0.2304, 0.2588]}


def get_size_from_signature(signature: dict) -> tuple[int, int]:
    """The (H, W) input size a checkpoint's signature declares."""
    shape = signature["inputs"][0]["data_shape"]
    return int(shape[2]), int(shape[3])


def make_signature(size: tuple[int, int], num_outputs: int) -> dict:
    """A reference-style signature for an input of `size` and `num_outputs` outputs."""
    return {
        "inputs": [{"data_shape": [0, 3, int(size[0]), int(size[1])]}],
        "outputs": [{"data_shape": [0, int(num_outputs)]}],
    }


def normalize_stats(rgb_stats: dict | None) -> dict[str, list[float]]:
    """rgb_stats with plain float lists; the reference defaults when None."""
    stats = rgb_stats or DEFAULT_RGB_STATS
    return {"mean": [float(v) for v in stats["mean"]], "std": [float(v) for v in stats["std"]]}


def _rgb_if_pil(image):
    """A PIL image not in RGB mode as RGB (as `infer_image` reads it); anything else as it is."""
    return to_rgb(image) if isinstance(image, Image.Image) and image.mode != "RGB" else image


def classification_transform(
    size: tuple[int, int] | int,
    rgb_stats: dict | None = None,
    center_crop: float = 1.0,
    simple_crop: bool = False,
) -> Callable:
    """PIL image (any mode: RGBA, P, L, CMYK, ... become RGB) or uint8 (3, H, W) tensor -> normalised float32
    (3, H, W) tensor of `size`.

    With center_crop < 1 the image is first resized to size / center_crop, then center-cropped to size.
    simple_crop keeps the aspect ratio: the shorter side is resized to min(size) / center_crop first."""
    if isinstance(size, int):
        size = (size, size)
    if not 0 < center_crop <= 1:
        raise ValueError(f"center_crop must be in (0, 1], got {center_crop}")
    stats = normalize_stats(rgb_stats)
    base = (int(size[0] / center_crop), int(size[1] / center_crop))
    resize_to: int | tuple[int, int] = min(base) if simple_crop else base
    return v2.Compose(
        [
            v2.Lambda(_rgb_if_pil),
            v2.Resize(resize_to, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=stats["mean"], std=stats["std"]),
            v2.ToPureTensor(),
        ]
    )


def resize_batch(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased resize of a (B, 3, H, W) float batch."""
    return torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)


def five_crop_views(x: torch.Tensor, ratio: float = 0.8) -> list[torch.Tensor]:
    """Test-time augmentation views: the four corner crops and the center crop at `ratio` of the size, each
    resized back to the full size."""
    h, w = x.shape[-2:]
    ch, cw = int(h * ratio), int(w * ratio)
    crops = v2.functional.five_crop(x, [ch, cw])
    return [resize_batch(c, (h, w)) for c in crops]
