"""Training augmentation for fine-tuning, on decoded uint8 (3, H, W) tensors, with torchvision transforms v2.

- `training_transform`: random resized crop, horizontal flip, TrivialAugment or RandAugment, normalisation with
  the model's rgb_stats, random erasing.
- `batch_mix`: MixUp or CutMix (one of them per batch) producing soft targets.
- `auto_mix_prob(epochs)`: how often a batch is mixed by default. Mixing is a regulariser for long runs; on a
  run of a few epochs it mostly slows learning down, so the default ramps from 0 at 5 epochs to 1 at 50.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from hierax.errors import HieraxError
from hierax.transforms import normalize_stats

AUGMENTS = ("trivialaugment", "randaugment", "none")


def training_transform(
    size: tuple[int, int],
    rgb_stats: dict | None = None,
    augment: str = "trivialaugment",
    scale: tuple[float, float] = (0.08, 1.0),
    random_erasing: float = 0.25,
    randaugment_magnitude: int = 9,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (3, H, W) -> normalised float32 (3, *size), randomly augmented."""
    if augment not in AUGMENTS:
        raise HieraxError(f"unknown augmentation '{augment}': choose one of {', '.join(AUGMENTS)}")
    stats = normalize_stats(rgb_stats)
    steps: list = [
        v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR))
    elif augment == "randaugment":
        steps.append(v2.RandAugment(num_ops=2, magnitude=randaugment_magnitude))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=stats["mean"], std=stats["std"])]
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value=0))
    return v2.Compose(steps)


def auto_mix_prob(epochs: int) -> float:
    """The default share of mixed batches: 0 up to 5 epochs, rising linearly to 1 at 50 epochs."""
    return min(1.0, max(0.0, (epochs - 5) / 45))


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
