"""Where a batch job gets its model and its images: `resolve_model` (a name, a path or a loaded pair, on the
runtime a backend names) and `make_loader` (decoding and resizing in worker processes, errors as values), and
`iter_predictions`, the forward pass over such a loader that predict, embed and evaluate share.

A loader yields `hierax.data.datasets.collate_samples` batches: any dataset whose samples follow that contract
(for example one that cuts several crops out of each decoded frame) runs through `iter_predictions` unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from hierax.data.datasets import ImageDataset, collate_samples, default_workers
from hierax.data.metadata import Overrides
from hierax.distributed import default_device
from hierax.inference.classification import check_stages, infer_batch, infer_stages
from hierax.sizes import check_size
from hierax.weights.files import ModelInfo
from hierax.weights.load import load_pretrained_model, load_with_backend

ModelSpec = str | os.PathLike | tuple[torch.nn.Module, ModelInfo]


def resolve_model(
    model: ModelSpec,
    *,
    device: str | torch.device | None = None,
    size: tuple[int, int] | int | None = None,
    backend: str = "torch",
) -> tuple[torch.nn.Module, ModelInfo]:
    """(net, info) in eval mode from a name, a path, or an already loaded pair; `size` overrides info.size.
    `backend` (torch, inductor, onnxruntime, torchscript) picks the runtime of a name or path (see
    hierax.weights.load.load_with_backend); a loaded pair runs as it is."""
    size = check_size(size) if size is not None else None
    if isinstance(model, tuple):
        net, info = model
        net.eval()
        if device is not None:
            net.to(device)
        return net, info.with_size(size) if size else info
    if backend != "torch":
        return load_with_backend(model, backend, device=default_device(device), size=size)
    return load_pretrained_model(model, inference=True, device=default_device(device), new_size=size)


def model_label(model: ModelSpec, info: ModelInfo) -> str:
    """How outputs name the model: its registry name, its checkpoint's file name, or (loaded) its network."""
    if isinstance(model, tuple):
        return info.network
    text = os.fspath(model)
    return os.path.basename(text) if os.sep in text or os.path.exists(text) else text


def make_loader(
    paths: Sequence[str] | Dataset,
    transform=None,
    *,
    batch_size: int = 16,
    workers: int | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    meta: Sequence[Mapping] | None = None,
    capture: Overrides | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader that decodes and transforms in `workers` processes (default_workers() unless given) and
    collates with errors as values. `paths` may also be a dataset of collate_samples samples. `meta` and
    `capture`: see ImageDataset (per-path rows, and reading where and when each image was taken)."""
    workers = default_workers() if workers is None else workers
    dataset = (
        paths if isinstance(paths, Dataset) else ImageDataset(paths, transform, labels, meta=meta, capture=capture)
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_samples,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_yield_to_the_model,
    )


def _yield_to_the_model(_worker_id: int) -> None:
    """Lower a decoding worker's CPU priority: on a CPU-only machine the model's threads use every core, and a
    worker preempting one of them stalls them all at their next barrier."""
    os.nice(10)


@dataclass
class BatchResult:
    """One batch's outputs for its good images (input indices, paths, labels, per-image metadata) and its
    failures (index, path, reason)."""

    indices: np.ndarray
    paths: list[str]
    labels: np.ndarray
    probs: np.ndarray | None
    embeddings: np.ndarray | None
    features: dict[str, np.ndarray]
    errors: list[tuple[int, str, str]]
    meta: list[dict] = field(default_factory=list)


def iter_predictions(
    net: torch.nn.Module,
    loader: DataLoader,
    *,
    amp: bool = False,
    tta: bool = False,
    return_embedding: bool = False,
    features: Sequence[str] = (),
    progress: bool = True,
    total: int | None = None,
) -> Iterator[BatchResult]:
    """Run `net` over a loader of collate_samples batches; yields one BatchResult per batch, failures included.

    The tqdm bar counts every image (ok or failed) and shows images/s."""
    features = check_stages(features)
    failed = 0
    with tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1) as bar:
        for batch in loader:
            probs = emb = None
            feats: dict[str, np.ndarray] = {}
            if batch["images"] is not None:
                if features:
                    probs, emb, feats = infer_stages(net, batch["images"], features, tta=tta, amp=amp)
                else:
                    probs, emb = infer_batch(net, batch["images"], return_embedding=return_embedding, tta=tta, amp=amp)
            failed += len(batch["errors"])
            bar.update(len(batch["paths"]) + len(batch["errors"]))
            if failed:
                bar.set_postfix(failed=failed, refresh=False)
            yield BatchResult(
                batch["indices"].numpy(),
                batch["paths"],
                batch["labels"].numpy(),
                probs,
                emb,
                feats,
                batch["errors"],
                batch.get("meta", [{} for _ in batch["paths"]]),
            )
