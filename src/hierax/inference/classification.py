"""Single-image and batch inference: probabilities and, on request, embeddings, with optional test-time
augmentation (five crops at 0.8 of the size, resized back, softmax averaged)."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from hierax.data.images import ImageSource, load_image, to_rgb
from hierax.models.fastpath import native_half_dtypes
from hierax.transforms import five_crop_views

logger = logging.getLogger(__name__)


def device_and_dtype(net) -> tuple[torch.device, torch.dtype]:
    """Where a model runs and in which dtype: from its parameters, or an exported runner's attributes."""
    param = next(iter(net.parameters()), None) if isinstance(net, torch.nn.Module) else None
    if param is None:
        return torch.device(getattr(net, "device", "cpu")), getattr(net, "dtype", torch.float32)
    return param.device, param.dtype


@functools.cache
def _warn_emulated_bf16() -> None:
    logger.warning(
        "this CPU has no native bfloat16 kernels: amp (--amp) emulates it through float32 and runs about 8x slower"
        " here; leave amp off, or for speed use an int8 export (hierax export --quantize int8)"
    )


def bf16_autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `amp`, else a no-op. On a CPU that only emulates bf16 it warns once: the
    user asked for speed and would get an 8x slowdown (hieradet_d_small at 384 px, Zen 3: 0.40 against 3.1 img/s)."""
    if not amp:
        return contextlib.nullcontext()
    if device.type == "cpu" and torch.bfloat16 not in native_half_dtypes():
        _warn_emulated_bf16()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _forward(net: torch.nn.Module, x: torch.Tensor, return_embedding: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if return_embedding:
        emb = net.embedding(x)
        return net.classify(emb), emb
    return net(x), None


def infer_batch(
    net: torch.nn.Module,
    inputs: torch.Tensor,
    *,
    return_embedding: bool = False,
    tta: bool = False,
    amp: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (B, C) and optionally embeddings (B, E) for a normalised (B, 3, H, W) batch.

    The batch is moved to the net's device and dtype. amp runs under bf16 autocast; outputs are float32."""
    device, dtype = device_and_dtype(net)
    x = inputs.to(device=device, dtype=dtype if dtype.is_floating_point else torch.float32)
    views = five_crop_views(x) if tta else [x]
    probs_sum, emb_sum = None, None
    with torch.inference_mode(), bf16_autocast(device, amp):
        for view in views:
            logits, emb = _forward(net, view, return_embedding)
            probs = torch.softmax(logits.float(), dim=1)
            probs_sum = probs if probs_sum is None else probs_sum + probs
            if emb is not None:
                emb = emb.float()
                emb_sum = emb if emb_sum is None else emb_sum + emb
    probs_out = (probs_sum / len(views)).cpu().numpy()
    emb_out = (emb_sum / len(views)).cpu().numpy() if emb_sum is not None else None
    return probs_out, emb_out


def infer_image(
    net: torch.nn.Module,
    image: ImageSource | Image.Image | np.ndarray | torch.Tensor,
    transform: Callable,
    return_embedding: bool = False,
    tta: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (1, C) and optionally the embedding (1, E) of one image.

    `image` is a path, encoded bytes, a PIL image (any mode), an array or a uint8 tensor; it is converted
    to RGB with EXIF orientation applied, then `transform`ed (see classification_transform)."""
    pixels = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
    return infer_batch(net, transform(pixels).unsqueeze(0), return_embedding=return_embedding, tta=tta)
