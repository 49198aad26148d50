"""Peak memory of a DINOv2 pretraining run, estimated before it starts, against the memory the machine has.

What a step holds, from the largest: the student's saved activations (every global and local crop of the batch,
kept for backward), the weights with their gradients, AdamW moments, optimizer temporaries and the teacher copy,
the largest block's activations once more (backward and the teacher's forward pass), and the data loader's batches.
The per-crop activations are measured exactly by running the student on the "meta" device (no memory, no compute)
with a hook that counts what autograd saves, so the estimate follows any network config, crop size and head.
"""

from __future__ import annotations

import logging
import math
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hierax.errors import HieraxError
from hierax.models.hieradet import MultiScaleBlock

logger = logging.getLogger(__name__)

GB = 1024**3
# Each worker process's own memory besides its batches (a forked copy of the interpreter; measured ~0.15 GB).
WORKER_OVERHEAD = 0.2 * GB
PREFETCH_BATCHES = 2  # the DataLoader's default prefetch factor
STATE_COPIES = 6  # student weights, gradients, two AdamW moments, one optimizer temporary, the teacher
WARN_SHARE = 0.85  # warn above this share of the available memory (the estimate is within ~10%)
HOST_PARTS = ("runtime", "data")  # what stays in host memory when training on a GPU


class _SavedBytes:
    """Counts the bytes autograd saves while active (leaving out `module`'s weights, which it keeps anyway): in
    all, and per HieraDet block with each block's input."""

    def __init__(self, module: nn.Module) -> None:
        self.total = 0
        self.blocks: list[int] = []
        self.inputs: list[int] = []
        self._blocks = [m for m in module.modules() if isinstance(m, MultiScaleBlock)]
        self._weights = {id(p) for p in module.parameters()}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if id(t) not in self._weights and (t._base is None or id(t._base) not in self._weights):
            self.total += t.numel() * t.element_size()
        return t

    def _before(self, module: nn.Module, args: tuple) -> None:
        self._start = self.total
        self.inputs.append(args[0].numel() * args[0].element_size())

    def _after(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.blocks.append(self.total - self._start)

    def run(self, fn) -> _SavedBytes:
        handles = [b.register_forward_pre_hook(self._before) for b in self._blocks]
        handles += [b.register_forward_hook(self._after) for b in self._blocks]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                fn()
        finally:
            for h in handles:
                h.remove()
        return self


@dataclass(frozen=True)
class CropCost:
    """Per crop of one side: what autograd keeps (all blocks, or only block inputs under checkpointing) and the
    largest block's saved activations, in bytes."""

    saved: int
    checkpointed: int
    largest_block: int


def crop_cost(backbone: nn.Module, side: int) -> CropCost:
    """Measure one crop of `side` x `side` through `backbone` (a HieraDet on the meta device)."""

    x = torch.empty(1, 3, side, side, device="meta", requires_grad=True)
    saved = _SavedBytes(backbone).run(lambda: backbone.features[0](backbone.forward_features(x)))
    outside = saved.total - sum(saved.blocks)  # stem, position embedding, final norm
    return CropCost(saved.total, sum(saved.inputs) + outside, max(saved.blocks, default=0))


def head_row_bytes(head: nn.Module, student_temp: float = 0.1) -> int:
    """What one pooled embedding or token keeps through a head and its log-softmax (meta device)."""

    def run(rows: int) -> int:
        x = torch.empty(rows, head.mlp[0].in_features, device="meta", requires_grad=True)
        return _SavedBytes(head).run(lambda: F.log_softmax(head(x) / student_temp, dim=-1)).total

    return run(2) - run(1)  # the difference leaves out the normalised prototypes, kept once per call


@dataclass(frozen=True)
class MemoryEstimate:
    """The peak memory of one process (bytes), by part."""

    parts: dict[str, int]
    per_image: int

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def on(self, device: torch.device) -> int:
        """What lands on `device`: everything on a CPU, all but the host's parts on a GPU."""
        return self.total if device.type == "cpu" else sum(v for k, v in self.parts.items() if k not in HOST_PARTS)

    def describe(self) -> str:
        """E.g. 'runtime 0.9 GB, weights and optimizer 1.6 GB, activations 11.5 GB (368 MB per image), ...'."""
        items = [f"{name} {size / GB:.1f} GB" for name, size in self.parts.items()]
        items[list(self.parts).index("activations")] += f" ({self.per_image / 2**20:.0f} MB per image)"
        return ", ".join(items)


@dataclass(frozen=True)
class StudentCost:
    """What one image costs the student, measured once per run: its two global and its local crops, a head row
    of each head, and the student's weights (bytes)."""

    global_size: int
    local_size: int
    global_crop: CropCost
    local_crop: CropCost
    dino_row: int
    ibot_row: int
    weights: int

    @classmethod
    def measure(cls, student_on_meta: nn.Module, global_size: int, local_size: int) -> StudentCost:
        """Measure a DinoStudent built on the meta device."""
        backbone = student_on_meta.backbone
        return cls(
            global_size,
            local_size,
            crop_cost(backbone, global_size),
            crop_cost(backbone, local_size),
            head_row_bytes(student_on_meta.dino_head),
            head_row_bytes(student_on_meta.ibot_head),
            sum(p.numel() * p.element_size() for p in student_on_meta.parameters()),
        )


def estimate_peak_memory(
    cost: StudentCost,
    *,
    batch_size: int,
    local_crops: int,
    masked_tokens: float,
    num_workers: int,
    grad_checkpointing: bool = False,
    runtime: int | None = None,
) -> MemoryEstimate:
    """Estimate one training process's peak memory. `masked_tokens` is the mean number of iBOT tokens per image;
    `runtime` the memory the process holds before training (default: its current resident size)."""
    glob, loc = cost.global_crop, cost.local_crop
    keep = "checkpointed" if grad_checkpointing else "saved"
    per_image = 2 * getattr(glob, keep) + local_crops * getattr(loc, keep)
    per_image += (2 + local_crops) * cost.dino_row + math.ceil(masked_tokens) * cost.ibot_row
    largest = max(2 * glob.largest_block, local_crops * loc.largest_block)
    if grad_checkpointing:
        largest *= 2  # backward recomputes a block's activations and holds their gradients beside them
    crop_bytes = 4 * 3 * (2 * cost.global_size**2 + local_crops * cost.local_size**2)
    parts = {
        "runtime": current_rss() if runtime is None else runtime,
        "weights and optimizer": STATE_COPIES * cost.weights,
        "activations": batch_size * per_image,
        "backward": batch_size * largest,
        "data": num_workers * (PREFETCH_BATCHES * batch_size * crop_bytes + WORKER_OVERHEAD),
    }
    return MemoryEstimate(parts, per_image)


def current_rss() -> int:
    """This process's resident memory (bytes)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def available_memory(device: torch.device) -> int | None:
    """Memory a run on `device` may use (bytes): free GPU memory; on the CPU, this process's resident memory plus
    what the host (within its cgroup limit) has available. None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    meminfo = Path("/proc/meminfo")
    lines = meminfo.read_text().splitlines() if meminfo.exists() else []
    found = [int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")]
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 1 << 60:
            found.append(max(0, cap - used))
    return min(found) + current_rss() if found else None


def check_memory(
    estimate: Callable[[int, bool], MemoryEstimate],
    *,
    batch_size: int,
    accum_steps: int,
    grad_checkpointing: bool,
    device: torch.device,
    processes: int = 1,
    available: int | None = None,
) -> MemoryEstimate:
    """Compare the estimated peak of `processes` runs on this machine (or GPU) with what is available: log it,
    warn above WARN_SHARE of it, raise HieraxError with what to change when it does not fit.

    `estimate(batch_size, grad_checkpointing)` gives one process's MemoryEstimate; `available` defaults to
    `available_memory(device)`."""
    need = estimate(batch_size, grad_checkpointing)
    available = available_memory(device) if available is None else available
    on_device = need.on(device) * (processes if device.type == "cpu" else 1)
    where = "GPU memory" if device.type == "cuda" else "memory"
    times = f" x {processes} processes" * (processes > 1)
    logger.info("estimated peak %s: %.1f GB (%s)%s", where, need.on(device) / GB, need.describe(), times)
    if available is None:
        return need
    share = on_device / max(available, 1)
    if share <= WARN_SHARE:
        return need
    fixed = estimate(0, grad_checkpointing).on(device)
    per_image = (need.on(device) - fixed) / batch_size
    budget = available * WARN_SHARE / (processes if device.type == "cpu" else 1)
    fits = int((budget - fixed) // per_image) if per_image > 0 else batch_size
    options = []
    if fits >= 1:
        accum = math.ceil(batch_size * accum_steps / fits)
        options.append(f"--batch-size {fits} (or --batch-size {fits} --accum-steps {accum} to keep the global batch)")
    if not grad_checkpointing:
        options.append(f"--grad-checkpointing (about {estimate(batch_size, True).on(device) / GB:.1f} GB, slower)")
    options.append("fewer or smaller crops (--local-crops, --local-size, --size) or fewer --prototypes")
    need_text = f"about {on_device / GB:.1f} GB of {where} at its peak ({need.describe()}){times}"
    advice = f"use {'; or '.join(options)}"
    if share > 1.0:
        raise HieraxError(
            f"this run will not fit: it needs {need_text} and {available / GB:.1f} GB is available; {advice} "
            "(--no-memory-check starts it anyway)"
        )
    logger.warning("this run needs %s, close to the %.1f GB available; %s", need_text, available / GB, advice)
    return need
