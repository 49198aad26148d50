"""Batch jobs under torchrun: every rank takes an interleaved shard of the inputs and writes its own part
(`<stem>-rank<R><suffix>` beside the output and the errors file); rank 0 then merges the parts into one output in
input order and deletes them. Only barriers and counts travel between ranks (gloo), so a rank may wait hours
for the slowest one. Outside torchrun every method is the single-process case.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hierax.distributed import DistInfo, init_distributed
from hierax.errors import HieraxError
from hierax.inference import writers

RANK_TIMEOUT = datetime.timedelta(hours=12)


def shard_name(path: Path, rank: int) -> Path:
    """The part of `path` that `rank` writes: `<stem>-rank<R><suffix>`."""
    return path.with_name(f"{path.stem}-rank{rank}{path.suffix}")


def join_ranks() -> DistInfo:
    """Join the torchrun group as a batch job does (gloo, a long timeout); single-process outside torchrun."""
    return init_distributed("cpu", backend="gloo", timeout=RANK_TIMEOUT)


@dataclass
class Shards:
    """This rank's place in a sharded job: which inputs it takes and where it writes them."""

    ddp: DistInfo
    output: Path | None
    errors: Path | None

    @classmethod
    def plan(cls, ddp: DistInfo, output: Path | None, errors: Path | None) -> Shards:
        if ddp.world_size > 1 and output is None:
            raise HieraxError("under torchrun, give an --output file: every rank writes its own part")
        return cls(ddp, output, errors)

    @property
    def sharded(self) -> bool:
        return self.ddp.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.ddp.rank == 0

    def my_output(self) -> Path | None:
        """Where this rank writes its rows: the output itself, or its rank part under torchrun."""
        return shard_name(self.output, self.ddp.rank) if self.output and self.sharded else self.output

    def my_errors(self) -> Path | None:
        return shard_name(self.errors, self.ddp.rank) if self.errors and self.sharded else self.errors

    def done_paths(self) -> set[str]:
        """Paths already written by an earlier run, to the output or to any rank's part (for --resume)."""
        if self.output is None:
            return set()
        done = writers.done_paths(self.output)
        for rank in range(self.ddp.world_size if self.sharded else 0):
            done |= writers.done_paths(shard_name(self.output, rank))
        return done

    def take(self, todo: Sequence[str]) -> list[str]:
        """This rank's interleaved share of `todo`, once every rank has read the same `done` (barrier), so no
        rank writes before all have looked."""
        self.ddp.barrier()
        return list(todo[self.ddp.rank :: self.ddp.world_size])

    def total(self, *counts: int) -> tuple[int, ...]:
        """Each count summed over ranks (in the order given)."""
        summed = self.ddp.all_reduce_sum(torch.tensor(counts, dtype=torch.int64))
        return tuple(int(c) for c in summed)

    def merge(self, columns: Sequence[str], order: Sequence[str], *, resume: bool) -> None:
        """Rank 0 merges every rank's part (and, on resume, the earlier output) into the output and the errors
        file, in input `order`; the others wait for it. Without an output (a job that writes its own files on
        rank 0) only the errors files are merged."""
        if not self.sharded:
            return
        self.ddp.barrier()
        if self.is_main:
            ranks = range(self.ddp.world_size)
            if self.output is not None:
                writers.merge_outputs(
                    [shard_name(self.output, r) for r in ranks], self.output, columns, order, resume=resume
                )
            if self.errors is not None:
                writers.merge_errors([shard_name(self.errors, r) for r in ranks], self.errors, order)
        self.ddp.barrier()
