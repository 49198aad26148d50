"""The engine's training state on disk (training_state.pt): what it holds, the RNG states that make resume exact,
and the checks that a resumed run is the same run."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

from hierax.distributed import DistInfo
from hierax.errors import CheckpointError


def rng_state() -> dict:
    """This process's torch, Python, NumPy (and CUDA) RNG states, as tensors and plain values (weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(dist: DistInfo) -> list[dict]:
    """Every rank's RNG state, in rank order (a collective: every rank must call it)."""
    own = rng_state()
    if not dist.enabled:
        return [own]
    gathered: list = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, own)
    return gathered


def read_training_state(path: Path, world_size: int, global_batch: int, total_steps: int) -> dict:
    """Load training_state.pt and check it belongs to a run of the same shape; CheckpointError otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read the training state {path}: {err}") from None
    if state["world_size"] != world_size or state["global_batch"] != global_batch:
        raise CheckpointError(
            f"{path} was written by {state['world_size']} process(es) with a global batch of "
            f"{state['global_batch']}; resume with the same number of processes and batch size"
        )
    if state["total_steps"] != total_steps:
        raise CheckpointError(
            f"{path} is a run of {state['total_steps']} steps, this one has {total_steps}: "
            "resume with the same data, epochs and batch size"
        )
    return state
