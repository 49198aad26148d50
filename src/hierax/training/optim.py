"""Optimizer parameter groups and schedules that scale to the run's length.

- `param_groups(module, weight_decay, layer_decay)`: AdamW groups with layer-wise LR decay over HieraDet's blocks
  (stem and position embeddings are layer 0, block i of the body is layer i + 1, the final norm, the classifier
  and any other head are the top layer) and no weight decay on norms, biases, position embeddings and mask
  tokens. Works on any module that holds a HieraDet (names are matched anywhere, e.g. `backbone.body.stage3.4`).
- `adamw(groups, lr, weight_decay)`: torch's AdamW, fused (one kernel over each tensor, no temporaries) where every
  parameter lives on a CPU or CUDA device.
- `warmup_steps`, `cosine_factor`, `cosine_value`: linear warmup then cosine, as functions of the step, so resume
  needs no scheduler state. The warmup is 5% of the run, but never under 100 steps unless that is more than 20%
  of the run: AdamW on a transformer from scratch needs its first steps at a low LR whatever the run's length,
  and 5% of a short run is a handful of steps (see benchmarks/README.md, "Training from scratch on small data").
- `auto_ema_decay(total_steps)`: an EMA whose time constant is a fixed share of the run (capped at 10,000 steps),
  so a short run gets an average that tracks the model instead of one that has barely moved from the init.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

_BLOCK = re.compile(r"(?:^|\.)body\.stage(\d+)\.(\d+)\.")
_BOTTOM = re.compile(r"(?:^|\.)(?:pos_embed|pos_embed_win|stem|mask_token)(?:\.|$)")
_NO_DECAY_NAMES = ("pos_embed", "pos_embed_win", "mask_token", "cls_token")
EMA_SHARE = 0.02
EMA_MAX_STEPS = 10_000
WARMUP_SHARE = 0.05  # of the run: the published recipe's warmup on long runs
WARMUP_MIN_STEPS = 100  # the warmup of a short run ...
WARMUP_MAX_SHARE = 0.2  # ... unless that is more than this share of it


def block_layer_ids(names: Iterable[str]) -> dict[tuple[int, int], int]:
    """Map each (stage, block) found in parameter names to its layer id 1..num_blocks, in network order."""
    blocks = sorted({(int(m.group(1)), int(m.group(2))) for n in names if (m := _BLOCK.search(n))})
    return {b: i + 1 for i, b in enumerate(blocks)}


def layer_id(name: str, blocks: dict[tuple[int, int], int]) -> int:
    """The layer of a parameter: 0 for the stem and embeddings, 1..N for body blocks, N + 1 for the rest."""
    if m := _BLOCK.search(name):
        return blocks[(int(m.group(1)), int(m.group(2)))]
    if _BOTTOM.search(name):
        return 0
    return len(blocks) + 1


def wants_weight_decay(name: str, ndim: int, extra_no_decay: Iterable[str] = ()) -> bool:
    """False for norms and biases (1-D), position embeddings, mask tokens and any name in `extra_no_decay`."""
    leaf = name.rsplit(".", 1)[-1]
    return ndim > 1 and leaf not in _NO_DECAY_NAMES and not any(s in name for s in extra_no_decay)


def param_groups(
    module: nn.Module, weight_decay: float, layer_decay: float = 1.0, extra_no_decay: Iterable[str] = ()
) -> list[dict]:
    """AdamW groups of the trainable parameters, each with "lr_scale" (layer decay) and "weight_decay"."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    blocks = block_layer_ids(n for n, _ in module.named_parameters())  # frozen blocks keep their layer ids
    top = len(blocks) + 1
    extra = tuple(extra_no_decay)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in named:
        lid = layer_id(name, blocks)
        decay = wants_weight_decay(name, param.ndim, extra)
        key = (lid, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "lr_scale": layer_decay ** (top - lid),
                "weight_decay": weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def adamw(groups: list[dict], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `groups`. Fused where every parameter is on a CPU or CUDA device: on CPU torch's default updates
    each tensor with a chain of separate kernels and temporaries as large as it (the DINOv2 heads' 65,536
    prototypes: 64 MiB each), where the fused kernel makes one pass; the results agree within float rounding."""
    devices = {p.device.type for group in groups for p in group["params"]}
    fused = bool(devices) and devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)


def warmup_steps(total_steps: int, steps_per_epoch: int, warmup_epochs: float | None) -> int:
    """Warmup length in steps: `warmup_epochs` when given, else 5% of the run but at least 100 steps or 20% of
    the run, whichever is fewer; never more than half of the run."""
    if warmup_epochs is not None:
        steps = round(warmup_epochs * steps_per_epoch)
    else:
        floor = min(WARMUP_MIN_STEPS, round(WARMUP_MAX_SHARE * total_steps))
        steps = max(round(WARMUP_SHARE * total_steps), floor)
    return max(0, min(steps, total_steps // 2))


def cosine_factor(step: int, total_steps: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at `step`: linear warmup to 1 over `warmup` steps, then cosine down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_value(step: int, total_steps: int, start: float, end: float) -> float:
    """A value going from `start` to `end` along a half cosine over the run (e.g. weight decay, momentum)."""
    progress = min(1.0, step / max(1, total_steps - 1))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def auto_ema_decay(total_steps: int) -> float:
    """An EMA decay whose time constant is 2% of the run, between 1 and 10,000 steps."""
    tau = min(max(EMA_SHARE * total_steps, 1.0), EMA_MAX_STEPS)
    return 1.0 - 1.0 / tau if tau > 1 else 0.0


def ema_decay_at(step: int, total_steps: int, decay: float | None = None) -> float:
    """The EMA decay for `step`: `decay` (or auto_ema_decay), warmed up as (1 + step) / (10 + step)."""
    target = auto_ema_decay(total_steps) if decay is None else decay
    return min(target, (1.0 + step) / (10.0 + step))
