"""Data order and I/O helpers of the training engine: per-rank micro-batches of (index, seed), per-sample seeded
augmentation with bad-sample replacement, a validation loader that forks once, the default worker count, device
transfer and atomic file writes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hierax.atomic import atomic_write
from hierax.errors import HieraxError

MAX_DEFAULT_WORKERS = 4


def default_workers() -> int:
    """Data-loader worker processes when none are asked for: one per CPU, at most 4 (more than the CPUs makes
    PyTorch warn and only adds contention)."""
    return min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the sample at `position` of `epoch`'s order."""
    return ((seed * 1_000_003 + epoch * 7_919 + 1) * 2_147_483_647 + position) & 0x7FFF_FFFF_FFFF_FFFF


class EpochBatchSampler(Sampler):
    """Per-rank micro-batches of (index, augmentation seed) for one epoch, from micro-batch `start` on."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        micro_batches: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        start: int = 0,
    ) -> None:
        self.n, self.batch_size, self.micro_batches = n, batch_size, micro_batches
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch, self.start = seed, epoch, start

    def __len__(self) -> int:
        return self.micro_batches - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)  # a tensor: no Python int per image on large sets
        span = self.batch_size * self.world_size
        for m in range(self.start, self.micro_batches):
            first = m * span + self.rank * self.batch_size
            yield [
                (int(order[p]), sample_seed(self.seed, self.epoch, p)) for p in range(first, first + self.batch_size)
            ]


class RunBatchSampler(Sampler):
    """EpochBatchSampler's micro-batches of every epoch from micro-batch `start` of the run to micro-batch `end`.
    One DataLoader serves the whole run: its workers fork once, before the first step while the process is small,
    instead of at each epoch start, where every page the trainer then writes is copied from the forked image
    (seconds of page faults an epoch), and they read ahead across epoch ends."""

    def __init__(
        self, n: int, batch_size: int, micro_batches: int, rank: int, world_size: int, seed: int, start: int, end: int
    ) -> None:
        self.epoch_args = (n, batch_size, micro_batches, rank, world_size, seed)
        self.micro_batches, self.start, self.end = micro_batches, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch in range(self.start // self.micro_batches, -(-self.end // self.micro_batches)):
            first = max(self.start - epoch * self.micro_batches, 0)
            last = min(self.end - epoch * self.micro_batches, self.micro_batches)
            epoch_order = iter(EpochBatchSampler(*self.epoch_args, epoch=epoch, start=first))
            for _ in range(first, last):
                yield next(epoch_order)


class _Passes(Sampler):
    """Batches of range(n) in order while `on`; none while off (the empty pass that starts the workers)."""

    def __init__(self, n: int, batch_size: int) -> None:
        self.n, self.batch_size, self.on = n, batch_size, True

    def __len__(self) -> int:
        return -(-self.n // self.batch_size) if self.on else 0

    def __iter__(self) -> Iterator[list[int]]:
        if self.on:
            for first in range(0, self.n, self.batch_size):
                yield list(range(first, min(first + self.batch_size, self.n)))


class StandingLoader:
    """An in-order DataLoader (validation) whose workers fork once, at `start()`, and serve every later pass.
    Forked at each epoch end instead, from a trainer of several GB, they make it copy every page it writes while
    they live; started before the first step they hold no batches between passes."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, collate_fn: Any) -> None:
        self._passes = _Passes(len(dataset), batch_size)
        self.loader = DataLoader(
            dataset,
            batch_sampler=self._passes,
            num_workers=num_workers,
            collate_fn=collate_fn,
            persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(0),  # leaves the global RNG (exact resume) alone
        )

    def start(self) -> None:
        """Fork the workers now with an empty pass (nothing is read)."""
        if self.loader.num_workers:
            self._passes.on = False
            for _ in self.loader:
                pass
            self._passes.on = True

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)


class SeededSamples(Dataset):
    """Wraps a dataset: item (index, seed) runs the base item under a torch RNG seeded by `seed`. A dict sample
    with an "error" is recorded and replaced by another index drawn from `seed` (not the next one, so a whole
    folder of bad files does not exhaust the retries). Items are (sample, [(index, path, reason)])."""

    def __init__(self, base: Dataset, max_retries: int = 16) -> None:
        self.base, self.max_retries = base, max_retries

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, list]:
        index, seed = item
        skipped = []
        for attempt in range(self.max_retries + 1):
            if attempt:
                g = torch.Generator().manual_seed(seed + attempt)
                index = int(torch.randint(len(self.base), (), generator=g))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + attempt)
                sample = self.base[index]
            error = sample.get("error") if isinstance(sample, dict) else None
            if error is None:
                return sample, skipped
            skipped.append((int(sample.get("index", index)), str(sample.get("path", "")), str(error)))
        raise HieraxError(
            f"{self.max_retries + 1} samples in a row failed to load (is most of the data unreadable?), last: "
            f"{skipped[-1][1]}: {skipped[-1][2]}"
        )


def to_device(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor in it (nested dicts, lists, tuples) moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temporary file, then rename)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
