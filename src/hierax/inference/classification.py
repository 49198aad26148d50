"""Single-image and batch inference: probabilities and, on request, embeddings or pooled stage features, with
optional test-time augmentation (five crops at 0.8 of the size, resized back, outputs averaged), and the check
that a model has a classifier at all."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from hierax.data.images import ImageSource, load_image, to_rgb
from hierax.errors import HieraxError
from hierax.models.fastpath import images_per_forward, native_half_dtypes
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


STAGES = ("stage1", "stage2", "stage3", "stage4")


def check_stages(stages: Sequence[str]) -> list[str]:
    """The stage names as a list; HieraxError for a name that is not one of STAGES."""
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise HieraxError(f"unknown feature stage(s) {bad}; choose from {', '.join(STAGES)}")
    return list(stages)


def average_over_views(
    forward: Callable[[torch.Tensor], Sequence[torch.Tensor]], x: torch.Tensor, tta: bool, per_call: int = 0
) -> list[torch.Tensor]:
    """Each output of forward(x), as float32; with tta, averaged over the five-crop views of x instead (the one
    test-time augmentation rule of infer_batch, infer_stages, predict and serve). The views are cut before
    forward runs, outside any autocast it opens. `per_call` > 0: forward takes at most that many images at a
    time, in near-equal parts whose outputs are joined (see hierax.models.fastpath.images_per_forward)."""
    views = five_crop_views(x) if tta else [x]
    parts = -(-len(x) // per_call) if per_call > 0 else 1
    sums: list[torch.Tensor] | None = None
    for view in views:
        pieces = [[out.float() for out in forward(part)] for part in view.tensor_split(parts)]
        outputs = [torch.cat(joined) if parts > 1 else joined[0] for joined in zip(*pieces, strict=True)]
        sums = outputs if sums is None else [total + out for total, out in zip(sums, outputs, strict=True)]
    return [total / len(views) for total in sums]


def _per_call(net, x: torch.Tensor, amp: bool) -> int:
    """Images per forward call of `net` on the batch `x` (bf16 activations under amp)."""
    return images_per_forward(net, x, torch.bfloat16 if amp else None)


def _on_device(net, inputs: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
    """The net's device, and the batch moved there in the net's floating dtype (float32 for integer runners)."""
    device, dtype = device_and_dtype(net)
    return device, inputs.to(device=device, dtype=dtype if dtype.is_floating_point else torch.float32)


def infer_batch(
    net: torch.nn.Module,
    inputs: torch.Tensor,
    *,
    return_embedding: bool = False,
    tta: bool = False,
    amp: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (B, C) and optionally embeddings (B, E) for a normalised (B, 3, H, W) batch.

    The batch is moved to the net's device and dtype. amp runs under bf16 autocast; outputs are float32. On CPU
    a large batch runs a few images at a time (hierax.models.fastpath.images_per_forward): faster, and its peak
    memory no longer grows with the batch."""
    device, x = _on_device(net, inputs)

    def forward(view: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with bf16_autocast(device, amp):
            if not return_embedding:
                return (torch.softmax(net(view).float(), dim=1),)
            emb = net.embedding(view)
            return torch.softmax(net.classify(emb).float(), dim=1), emb

    with torch.inference_mode():
        outputs = [out.cpu().numpy() for out in average_over_views(forward, x, tta, _per_call(net, x, amp))]
    return outputs[0], outputs[1] if return_embedding else None


def infer_stages(
    net: torch.nn.Module, inputs: torch.Tensor, stages: Sequence[str], *, tta: bool = False, amp: bool = False
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Probabilities, embeddings and the spatially pooled features of `stages` (e.g. ["stage1", "stage4"]) in one
    pass; torch models only (exported graphs give logits and embeddings)."""
    if not hasattr(net, "forward_stages"):
        raise HieraxError("stage features need the torch backend (exported graphs give logits and embeddings)")
    device, x = _on_device(net, inputs)
    positions = [STAGES.index(name) for name in check_stages(stages)]

    def forward(view: torch.Tensor) -> list[torch.Tensor]:
        with bf16_autocast(device, amp):
            maps = net.forward_stages(view)
            emb = net.forward_head(maps[-1], pre_logits=True)
            pooled = [maps[i].float().mean(dim=(1, 2)) for i in positions]
            return [torch.softmax(net.classify(emb).float(), dim=1), emb, *pooled]

    with torch.inference_mode():
        views = average_over_views(forward, x, tta, _per_call(net, x, amp))
        probs, emb, *pooled = [out.cpu().numpy() for out in views]
    return probs, emb, dict(zip(stages, pooled, strict=True))


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
