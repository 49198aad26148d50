"""One home for where a process runs: its rank in a torchrun group, its device, and seeding.

Training (gradients over nccl on CUDA, gloo on CPU) and batch prediction (only barriers and counts, always
gloo) both join the group here. Outside torchrun everything is a single-process no-op. This sits beside
atomic.py rather than under training/ because inference uses it too and must not import training.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as torch_dist


def is_main_rank() -> bool:
    """True outside torchrun and on its rank 0 (read from the environment: no group needed)."""
    return os.environ.get("RANK", "0") == "0"


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device` when given; else CUDA when available (this rank's GPU, LOCAL_RANK, under torchrun), else CPU.
    A bare "cuda" also means this rank's GPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


@dataclass
class DistInfo:
    """This process's place in a (possibly single-process) run. `owns_group`: this process joined the group
    and should leave it (close_distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `tensor` (a new tensor; itself when single-process)."""
        if not self.enabled:
            return tensor
        out = tensor.detach().clone().to(self.comm_device)
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
        return out.to(tensor.device)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of `tensor`."""
        return self.all_reduce_sum(tensor) / self.world_size if self.enabled else tensor

    def gather_objects(self, obj) -> list | None:
        """Every rank's picklable `obj` on rank 0, in rank order (None on the other ranks); [obj] single-process."""
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size if self.is_main else None
        torch_dist.gather_object(obj, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    @property
    def comm_device(self) -> torch.device:
        """Where collectives run: the device for nccl, the CPU for gloo."""
        if self.enabled and torch_dist.get_backend() == "nccl":
            return self.device
        return torch.device("cpu")


def init_distributed(
    device: str | torch.device | None = None,
    *,
    backend: str | None = None,
    timeout: datetime.timedelta | None = None,
) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 and quiet hierax's logging on non-zero ranks.

    backend: None picks nccl on CUDA and gloo on CPU (training); batch prediction asks for gloo and a long
    timeout, since its ranks only exchange barriers and counts and may wait on the slowest one for hours."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = default_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = world_size > 1 and not torch_dist.is_initialized()
    if owns:
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        extra = {"timeout": timeout} if timeout is not None else {}
        torch_dist.init_process_group(backend, rank=rank, world_size=world_size, **extra)
    if rank != 0:
        logging.getLogger("hierax").setLevel(logging.WARNING)
    return DistInfo(rank, world_size, local_rank, dev, owns)


def close_distributed(info: DistInfo | None = None) -> None:
    """Leave the process group: the one `info` joined, or whichever is open when `info` is None."""
    if torch_dist.is_initialized() and (info is None or info.owns_group):
        torch_dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed torch, Python and NumPy; call it before building a model so its init is reproducible."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
