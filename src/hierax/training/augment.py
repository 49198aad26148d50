"""Training augmentation for fine-tuning, on decoded uint8 (3, H, W) tensors, with torchvision transforms v2.

- `training_transform`: random resized crop, horizontal flip, TrivialAugment or RandAugment, normalisation with
  the model's rgb_stats, random erasing. Strength 0 is a plain resize: no flip either, unless asked for (a mirror
  image is another class for digits, text and subjects whose sides differ).
- `BatchMix`: MixUp or CutMix (one of them per batch) producing soft targets.
- `auto_strength(epochs)`, `auto_mix_prob(epochs)`: how strongly a run is augmented and mixed by default.
  Augmentation and mixing regularise long runs; on a short run they mostly slow learning down (figures in
  benchmarks/README.md, "Training"). So one strength in [0, 1] ramps from 0 at 5 epochs to 1 at 100 and sets
  the crop's smallest area and how often the policy and random erasing apply; the share of mixed batches ramps
  from 0 at 20 epochs to 1 at 100, so the full recipe is that of the long DeiT-style runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from hierax.errors import HieraxError
from hierax.transforms import normalize_stats

AUGMENTS = ("trivialaugment", "randaugment", "none")
FULL_MIN_CROP = 0.08  # the full recipe's smallest crop area share
FULL_RANDOM_ERASING = 0.25


def training_transform(
    size: tuple[int, int],
    rgb_stats: dict | None = None,
    augment: str = "trivialaugment",
    strength: float = 1.0,
    min_crop: float | None = None,
    random_erasing: float | None = None,
    randaugment_magnitude: int = 9,
    hflip: bool | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (3, H, W) -> normalised float32 (3, *size), randomly augmented. `strength` in [0, 1] scales the
    recipe: crop area from (1 - 0.92 * strength) of the image, the policy applied with probability `strength`,
    random erasing with 0.25 * strength, horizontal flips (p 0.5) whenever strength > 0; at 0 a plain resize.
    `min_crop`, `random_erasing` and `hflip` override."""
    if augment not in AUGMENTS:
        raise HieraxError(f"unknown augmentation '{augment}': choose one of {', '.join(AUGMENTS)}")
    if not 0.0 <= strength <= 1.0:
        raise HieraxError(f"augmentation strength must be within [0, 1], got {strength}")
    min_crop = 1.0 - (1.0 - FULL_MIN_CROP) * strength if min_crop is None else min_crop
    if not 0.0 < min_crop <= 1.0:
        raise HieraxError(f"the smallest crop share must be within (0, 1], got {min_crop}")
    erasing = FULL_RANDOM_ERASING * strength if random_erasing is None else random_erasing
    stats = normalize_stats(rgb_stats)
    bicubic = v2.InterpolationMode.BICUBIC
    crop = (
        v2.Resize(size, interpolation=bicubic, antialias=True)
        if min_crop >= 1.0
        else v2.RandomResizedCrop(size, scale=(min_crop, 1.0), interpolation=bicubic, antialias=True)
    )
    steps: list = [crop]
    if hflip or (hflip is None and strength > 0):
        steps.append(v2.RandomHorizontalFlip())
    policy = None
    if augment == "trivialaugment":
        policy = v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR)
    elif augment == "randaugment":
        policy = v2.RandAugment(num_ops=2, magnitude=randaugment_magnitude)
    if policy is not None and strength > 0:
        steps.append(policy if strength >= 1.0 else v2.RandomApply([policy], p=strength))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=stats["mean"], std=stats["std"])]
    if erasing > 0:
        steps.append(v2.RandomErasing(p=erasing, value=0))
    return v2.Compose(steps)


def _ramp(epochs: int, start: int, end: int) -> float:
    """0 up to `start` epochs, rising linearly to 1 at `end` epochs."""
    return min(1.0, max(0.0, (epochs - start) / (end - start)))


def auto_strength(epochs: int) -> float:
    """The default augmentation strength: 0 up to 5 epochs, rising linearly to 1 at 100 epochs."""
    return _ramp(epochs, 5, 100)


def auto_mix_prob(epochs: int) -> float:
    """The default share of MixUp/CutMix batches: 0 up to 20 epochs, rising linearly to 1 at 100 epochs."""
    return _ramp(epochs, 20, 100)


class BatchMix:
    """MixUp (alpha `mixup`) or CutMix (alpha `cutmix`), chosen at random, applied to a batch with probability
    `prob`. Returns (images, soft targets (B, C)); unmixed batches get one-hot targets."""

    def __init__(self, num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, prob: float = 1.0) -> None:
        self.num_classes, self.prob = num_classes, prob
        choices = []
        if mixup > 0:
            choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix > 0:
            choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        self.mix = v2.RandomChoice(choices) if choices else None

    @property
    def enabled(self) -> bool:
        return self.mix is not None and self.prob > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.enabled and torch.rand(()).item() < self.prob:
            return self.mix(images, labels)
        return images, torch.nn.functional.one_hot(labels, self.num_classes).to(images.dtype)
