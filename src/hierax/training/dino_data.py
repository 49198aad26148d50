"""Data side of DINOv2 pretraining: multi-crop augmentation, block masks for iBOT, and batch collation.

The augmentation draws from torch's global RNG, which the training engine seeds per sample (seed, epoch,
position), so a resumed run sees the very same crops whatever the number of workers."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from hierax.transforms import DEFAULT_RGB_STATS


def _blur(size: int, reference: int, p: float) -> T.Transform:
    """Gaussian blur with DINOv2's sigma range (0.1-2.0 at the reference crop size), scaled to `size`."""
    scale = min(1.0, size / reference)
    kernel = max(3, 2 * round(4 * scale) + 1)
    return T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1 * scale, 2.0 * scale))], p=p)


@dataclass(frozen=True)
class MultiCropConfig:
    """Crop sizes, counts and scales. DINOv2: 2 global 224 (0.32-1), 8 local 96 (0.05-0.32)."""

    global_size: int = 224
    local_size: int = 96
    local_crops: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)


class MultiCropAugmentation:
    """uint8 (3, H, W) image -> list of normalised float crops: [global 1, global 2, local 1, ..., local N].

    Both global crops get colour jitter (0.4, 0.4, 0.2, 0.1, p=0.8) and grayscale (p=0.2); the first is always
    blurred, the second blurred with p=0.1 and solarised with p=0.2; local crops are blurred with p=0.5."""

    def __init__(
        self,
        config: MultiCropConfig = MultiCropConfig(),
        mean: Sequence[float] = tuple(DEFAULT_RGB_STATS["mean"]),
        std: Sequence[float] = tuple(DEFAULT_RGB_STATS["std"]),
    ) -> None:
        self.config = config
        bicubic = InterpolationMode.BICUBIC

        def geometry(size: int, scale: tuple[float, float]) -> list[T.Transform]:
            return [
                T.RandomResizedCrop(size, scale=scale, interpolation=bicubic, antialias=True),
                T.RandomHorizontalFlip(),
            ]

        colour = [
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
        finish = [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
        g, lsz = config.global_size, config.local_size
        self.global1 = T.Compose(geometry(g, config.global_scale) + colour + [_blur(g, 224, 1.0)] + finish)
        self.global2 = T.Compose(
            geometry(g, config.global_scale)
            + colour
            + [_blur(g, 224, 0.1), T.RandomSolarize(threshold=128, p=0.2)]
            + finish
        )
        self.local = T.Compose(geometry(lsz, config.local_scale) + colour + [_blur(lsz, 96, 0.5)] + finish)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        crops = [self.global1(image), self.global2(image)]
        crops.extend(self.local(image) for _ in range(self.config.local_crops))
        return crops


def collate_multicrop(samples: list[dict]) -> dict:
    """Batch multi-crop samples: `global` (2B, 3, G, G) and `local` (N*B, 3, L, L), crop-major (all images'
    first crop, then all images' second crop, ...); failed samples travel in `errors` as (index, path, reason)."""
    good = [s for s in samples if s["error"] is None]
    errors = [(s["index"], s["path"], s["error"]) for s in samples if s["error"] is not None]
    if not good:
        return {"global": None, "local": None, "indices": torch.zeros(0, dtype=torch.long), "errors": errors}
    n_crops = len(good[0]["image"])
    per_crop = [torch.stack([s["image"][c] for s in good]) for c in range(n_crops)]
    return {
        "global": torch.cat(per_crop[:2]),
        "local": torch.cat(per_crop[2:]) if n_crops > 2 else None,
        "indices": torch.tensor([s["index"] for s in good], dtype=torch.long),
        "errors": errors,
    }


def block_mask(height: int, width: int, num_masked: int, rng: random.Random) -> torch.Tensor:
    """A (height, width) bool mask of about `num_masked` cells made of random rectangles (BEiT-style blocks,
    aspect ratio 0.3-3.3), so the masked area cannot be filled in from immediate neighbours."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    num_masked = min(num_masked, height * width)
    min_block = min(4, max(1, num_masked))
    log_ratio = (math.log(0.3), math.log(1 / 0.3))
    count, failures = 0, 0
    while count < num_masked and failures < 20:
        remaining = num_masked - count
        area = rng.uniform(min_block, max(min_block, remaining))
        aspect = math.exp(rng.uniform(*log_ratio))
        h = max(1, int(round(math.sqrt(area * aspect))))
        w = max(1, int(round(math.sqrt(area / aspect))))
        if h > height or w > width:
            failures += 1
            continue
        top, left = rng.randint(0, height - h), rng.randint(0, width - w)
        added = int((~mask[top : top + h, left : left + w]).sum())
        if 0 < added <= remaining:
            mask[top : top + h, left : left + w] = True
            count += added
            failures = 0
        else:
            failures += 1
    return mask


def sample_masks(
    batch: int,
    grid: tuple[int, int],
    rng: random.Random,
    probability: float = 0.5,
    ratio: tuple[float, float] = (0.1, 0.5),
) -> torch.Tensor:
    """(batch, h, w) masks on the stride-32 grid: a `probability` share of the images get a block mask, their
    ratios spread evenly over `ratio` (as DINOv2 does), the rest none; the order is shuffled."""
    h, w = grid
    n_masked = int(batch * probability)
    bounds = torch.linspace(ratio[0], ratio[1], n_masked + 1).tolist()
    masks = [block_mask(h, w, max(1, int(h * w * rng.uniform(bounds[i], bounds[i + 1]))), rng) for i in range(n_masked)]
    masks.extend(torch.zeros(h, w, dtype=torch.bool) for _ in range(batch - n_masked))
    rng.shuffle(masks)
    return torch.stack(masks)


def stage_grids(height: int, width: int, q_stride: int = 2, stages: int = 4) -> list[tuple[int, int]]:
    """Token grid of each HieraDet stage for an input of height x width (stem ceil /4, then floor /q_stride)."""
    h, w = math.ceil(height / 4), math.ceil(width / 4)
    grids = [(h, w)]
    for _ in range(stages - 1):
        h, w = h // q_stride, w // q_stride
        grids.append((h, w))
    return grids


def upsample_mask(mask: torch.Tensor, factor: int, stem_grid: tuple[int, int]) -> torch.Tensor:
    """Stride-32 masks (B, h, w) -> stem-grid masks (B, H0, W0): each cell covers `factor` x `factor` stem tokens;
    stem rows/columns past the last full cell (dropped by the floor pooling anyway) stay unmasked."""
    up = mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    out = torch.zeros(mask.shape[0], *stem_grid, dtype=torch.bool, device=mask.device)
    h, w = min(up.shape[1], stem_grid[0]), min(up.shape[2], stem_grid[1])
    out[:, :h, :w] = up[:, :h, :w]
    return out
