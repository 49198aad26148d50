"""Batch prediction and embedding over many files: `predict(...)` and `embed(...)`, which the CLI wraps.

sources -> DataLoader (decode + resize in workers, errors as values) -> `iter_predictions` (batched forward via
`infer_batch`, amp, tta) -> rows (top-k, taxonomy, roll-up) -> chunked writers. Bad files become rows of the
errors file; they never stop the run. Under torchrun (WORLD_SIZE > 1) every rank takes an interleaved shard of
the inputs and writes its own part; rank 0 then merges the parts into one output in input order.
`model` is a registry name, a checkpoint path, or an already loaded `(net, info)` pair.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hierax.data.datasets import ImageDataset, collate_samples
from hierax.data.sources import expand_sources
from hierax.data.taxonomy import RANKS, Taxonomy, load_common_names, restrict, top_k
from hierax.distributed import close_distributed, default_device, init_distributed
from hierax.errors import HieraxError
from hierax.inference import writers
from hierax.inference.classification import bf16_autocast, device_and_dtype, infer_batch
from hierax.transforms import classification_transform, five_crop_views
from hierax.weights.catalog import DEFAULT_MODEL
from hierax.weights.files import ModelInfo
from hierax.weights.load import load_pretrained_model

logger = logging.getLogger(__name__)

STAGES = ("stage1", "stage2", "stage3", "stage4")
ModelSpec = str | os.PathLike | tuple[torch.nn.Module, ModelInfo]


@dataclass
class BatchResult:
    """One batch's outputs for its good images (input indices, paths) and its failures (index, path, reason)."""

    indices: np.ndarray
    paths: list[str]
    labels: np.ndarray
    probs: np.ndarray | None
    embeddings: np.ndarray | None
    features: dict[str, np.ndarray]
    errors: list[tuple[int, str, str]]


@dataclass
class RunSummary:
    """What a predict / embed run did. Without an output file, `rows` holds the results and `errors` the
    (path, reason) of every failed image."""

    total: int
    succeeded: int
    failed: int
    skipped: int
    seconds: float
    output: Path | None = None
    errors_output: Path | None = None
    rows: list[dict] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return (self.succeeded + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        text = f"{self.succeeded} ok, {self.failed} failed"
        if self.skipped:
            text += f", {self.skipped} skipped (already done)"
        text += f" of {self.total} images in {self.seconds:.1f} s ({self.images_per_s:.2f} images/s)"
        if self.output:
            text += f" -> {self.output}"
        if self.failed and self.errors_output:
            text += f"; errors in {self.errors_output}"
        return text


def resolve_model(
    model: ModelSpec,
    *,
    device: str | torch.device | None = None,
    size: tuple[int, int] | int | None = None,
    backend: str = "torch",
) -> tuple[torch.nn.Module, ModelInfo]:
    """(net, info) in eval mode from a name, a path, or an already loaded pair; `size` overrides info.size.
    `backend` (torch, onnxruntime, torchscript) picks the runtime; see hierax.weights.load.load_with_backend."""
    if isinstance(model, tuple):
        net, info = model
        net.eval()
        if device is not None:
            net.to(device)
        return net, info.with_size(size) if size else info
    if backend != "torch":
        from hierax.weights.load import load_with_backend

        if isinstance(size, int):
            size = (size, size)
        return load_with_backend(model, backend, device=default_device(device), size=size)
    return load_pretrained_model(model, inference=True, device=default_device(device), new_size=size)


def make_loader(
    paths: Sequence[str],
    transform,
    *,
    batch_size: int = 16,
    workers: int | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader that decodes and transforms in `workers` processes and collates with errors as values."""
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    return DataLoader(
        ImageDataset(paths, transform, labels),
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


def _forward_stages(
    net: torch.nn.Module, x: torch.Tensor, stages: Sequence[str], tta: bool, amp: bool
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Probabilities, embeddings and spatially pooled stage features in one pass (averaged over TTA views)."""
    if not hasattr(net, "forward_stages"):
        raise HieraxError("stage features need the torch backend (exported graphs give logits and embeddings)")
    device, dtype = device_and_dtype(net)
    x = x.to(device=device, dtype=dtype)
    views = five_crop_views(x) if tta else [x]
    probs = emb = None
    pooled: dict[str, torch.Tensor] = {}
    with torch.inference_mode(), bf16_autocast(device, amp):
        for view in views:
            maps = net.forward_stages(view)
            e = net.forward_head(maps[-1], pre_logits=True)
            p = torch.softmax(net.classify(e).float(), dim=1)
            probs = p if probs is None else probs + p
            emb = e.float() if emb is None else emb + e.float()
            for name in stages:
                f = maps[STAGES.index(name)].float().mean(dim=(1, 2))
                pooled[name] = f if name not in pooled else pooled[name] + f
    n = len(views)
    return (probs / n).cpu().numpy(), (emb / n).cpu().numpy(), {k: (v / n).cpu().numpy() for k, v in pooled.items()}


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
    bad = [s for s in features if s not in STAGES]
    if bad:
        raise HieraxError(f"unknown feature stage(s) {bad}; choose from {', '.join(STAGES)}")
    failed = 0
    with tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1) as bar:
        for batch in loader:
            probs = emb = None
            feats: dict[str, np.ndarray] = {}
            if batch["images"] is not None:
                if features:
                    probs, emb, feats = _forward_stages(net, batch["images"], features, tta, amp)
                else:
                    probs, emb = infer_batch(net, batch["images"], return_embedding=return_embedding, tta=tta, amp=amp)
            failed += len(batch["errors"])
            bar.update(len(batch["paths"]) + len(batch["errors"]))
            if failed:
                bar.set_postfix(failed=failed, refresh=False)
            yield BatchResult(
                batch["indices"].numpy(), batch["paths"], batch["labels"].numpy(), probs, emb, feats, batch["errors"]
            )


def prediction_columns(k: int, taxonomy: Taxonomy, rollup: bool) -> list[str]:
    """Output columns: path, label_i/prob_i for the top k, taxonomy of the top label, common name, roll-up."""
    columns = ["path"]
    for i in range(1, k + 1):
        columns += [f"label_{i}", f"prob_{i}"]
    if taxonomy.is_taxonomic:
        columns += list(RANKS)
    if taxonomy.is_taxonomic or taxonomy.common_names:
        columns.append("common_name")
    if rollup:
        columns += ["rollup_rank", "rollup_name", "rollup_prob"]
    return columns


def prediction_rows(
    paths: Sequence[str],
    probs: np.ndarray,
    taxonomy: Taxonomy,
    *,
    k: int = 5,
    allowed: np.ndarray | None = None,
    rollup: bool = False,
    thresholds: Mapping[str, float] | None = None,
) -> list[dict]:
    """One flat row per image: top-k labels and probabilities (after the species list), taxonomy, roll-up."""
    if allowed is not None:
        probs = restrict(probs, allowed)
    idx, vals = top_k(probs, min(k, len(taxonomy)))
    rolled = taxonomy.rollup(probs, thresholds) if rollup else None
    rows = []
    for r, path in enumerate(paths):
        row: dict = {"path": path}
        for j in range(idx.shape[1]):
            row[f"label_{j + 1}"] = taxonomy.class_names[idx[r, j]]
            row[f"prob_{j + 1}"] = round(float(vals[r, j]), 6)
        best = int(idx[r, 0])
        taxon = taxonomy.taxon(best)
        if taxon is not None and taxonomy.is_taxonomic:
            row.update(taxon.as_dict())
        if taxonomy.is_taxonomic or taxonomy.common_names:
            row["common_name"] = taxonomy.common_name(best)
        if rolled is not None:
            row.update(rollup_rank=rolled[r].rank, rollup_name=rolled[r].name)
            row["rollup_prob"] = round(rolled[r].probability, 6)
        rows.append(row)
    return rows


def _shard_name(path: Path, tag: str, rank: int) -> Path:
    return path.with_name(f"{path.stem}-{tag}{rank}{path.suffix}")


def default_errors_path(output: Path) -> Path:
    """`<output stem>.errors.csv` beside the output."""
    return output.with_name(f"{output.stem}.errors.csv")


def _run(
    sources,
    model: ModelSpec,
    *,
    output: str | os.PathLike | None,
    errors_output: str | os.PathLike | None,
    columns_for,
    rows_for,
    batch_size: int,
    workers: int | None,
    device: str | torch.device | None,
    amp: bool,
    tta: bool,
    size,
    resume: bool,
    chunk_size: int,
    progress: bool,
    return_embedding: bool = False,
    features: Sequence[str] = (),
    backend: str = "torch",
) -> RunSummary:
    """The loop shared by predict and embed: sources -> loader -> forward -> rows -> writers, sharded by rank."""
    start = time.perf_counter()
    # Only barriers and counts travel between ranks, and a rank may wait hours for the slowest one.
    ddp = init_distributed("cpu", backend="gloo", timeout=datetime.timedelta(hours=12))
    try:
        paths = expand_sources(sources)
        if ddp.world_size > 1 and output is None:
            raise HieraxError("under torchrun, give an --output file: every rank writes its own part")
        net, info = resolve_model(model, device=device, size=size, backend=backend)
        columns, context = columns_for(info)
        output = Path(output) if output is not None else None
        my_output = _shard_name(output, "rank", ddp.rank) if output is not None and ddp.world_size > 1 else output
        errors_path = Path(errors_output) if errors_output else (default_errors_path(output) if output else None)
        my_errors = _shard_name(errors_path, "rank", ddp.rank) if errors_path and ddp.world_size > 1 else errors_path
        done: set[str] = set()
        if resume and output is not None:
            done = writers.done_paths(output)
            for rank in range(ddp.world_size if ddp.world_size > 1 else 0):
                done |= writers.done_paths(_shard_name(output, "rank", rank))
        todo = [p for p in paths if p not in done]
        if ddp.world_size > 1:
            ddp.barrier()  # every rank has read the same `done` before any rank writes again
        mine = todo[ddp.rank :: ddp.world_size]
        pin = device_and_dtype(net)[0].type == "cuda"
        transform = classification_transform(info.size, info.rgb_stats)
        loader = make_loader(mine, transform, batch_size=batch_size, workers=workers, pin_memory=pin)
        in_memory: list[dict] = []
        failures: list[tuple[str, str]] = []
        succeeded = failed = 0
        writer = writers.open_writer(my_output, columns, resume=resume, chunk_size=chunk_size) if my_output else None
        errors = writers.ErrorsWriter(my_errors) if my_errors else None
        try:
            results = iter_predictions(
                net,
                loader,
                amp=amp,
                tta=tta,
                return_embedding=return_embedding,
                features=features,
                progress=progress and ddp.rank == 0,
                total=len(mine),
            )
            for result in results:
                if result.paths:
                    rows = rows_for(result, context)
                    if writer:
                        writer.write(rows)
                    else:
                        in_memory.extend(rows)
                    succeeded += len(rows)
                failed += len(result.errors)
                if errors:
                    errors.write((path, reason) for _, path, reason in result.errors)
                else:
                    for _, path, reason in result.errors:
                        logger.warning("%s: %s", path, reason)
                        failures.append((path, reason))
        finally:
            if writer:
                writer.close()
            if errors:
                errors.close()
        if ddp.world_size > 1:
            counts = ddp.all_reduce_sum(torch.tensor([succeeded, failed], dtype=torch.int64))
            succeeded, failed = (int(v) for v in counts)
            ddp.barrier()
            if ddp.rank == 0:
                shards = [_shard_name(output, "rank", r) for r in range(ddp.world_size)]
                writers.merge_outputs(shards, output, columns, paths, resume=resume)
                _merge_errors([_shard_name(errors_path, "rank", r) for r in range(ddp.world_size)], errors_path, paths)
            ddp.barrier()
        seconds = time.perf_counter() - start
        summary = RunSummary(len(paths), succeeded, failed, len(paths) - len(todo), seconds, output, errors_path)
        summary.rows, summary.errors = in_memory, failures
        logger.debug("%s", summary.line())
        return summary
    finally:
        close_distributed(ddp)


def _merge_errors(shards: list[Path], target: Path, order: Sequence[str]) -> None:
    """Merge per-rank errors files into one, in input order, and delete the shards."""
    position = {p: i for i, p in enumerate(order)}
    rows = [row for shard in shards if shard.exists() for row in writers.read_errors(shard)]
    rows.sort(key=lambda row: position.get(row[0], len(position)))
    with writers.ErrorsWriter(target) as out:
        out.write(rows)
    for shard in shards:
        shard.unlink(missing_ok=True)


def predict(
    sources,
    model: ModelSpec = DEFAULT_MODEL,
    *,
    output: str | os.PathLike | None = None,
    errors_output: str | os.PathLike | None = None,
    top_k: int = 5,
    batch_size: int = 16,
    workers: int | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
    tta: bool = False,
    size: tuple[int, int] | int | None = None,
    resume: bool = False,
    common_names: str | os.PathLike | None = None,
    rollup: bool = False,
    thresholds: Mapping[str, float] | None = None,
    species_list: str | os.PathLike | Sequence[str] | None = None,
    chunk_size: int = 256,
    progress: bool = True,
    backend: str = "torch",
) -> RunSummary:
    """Classify every image named by `sources`; rows go to `output` (.csv/.jsonl/.parquet) or summary.rows.

    common_names: JSON index -> name, or an iNat21 annotation JSON. species_list: a file or a list of entries
    (class names, binomials, common names) that predictions are restricted to and renormalised over.
    rollup: add the deepest rank whose summed probability passes `thresholds` (species 0.8, genus 0.6,
    family 0.4 by default). backend: torch, onnxruntime or torchscript (see hierax.weights.load.load_with_backend)."""
    if top_k < 1:
        raise HieraxError("top_k must be at least 1")

    def columns_for(info: ModelInfo):
        names = load_common_names(common_names, info.class_names) if common_names else None
        taxonomy = Taxonomy(info.class_names, names)
        allowed = None
        if species_list is not None:
            if isinstance(species_list, str | os.PathLike):
                allowed = taxonomy.read_species_list(species_list)
            else:
                allowed = taxonomy.resolve_species_list(species_list)
        if rollup:
            taxonomy.check_rollup(thresholds)
        k = min(top_k, len(taxonomy))
        return prediction_columns(k, taxonomy, rollup), (taxonomy, allowed, k)

    def rows_for(result: BatchResult, context) -> list[dict]:
        taxonomy, allowed, k = context
        return prediction_rows(
            result.paths, result.probs, taxonomy, k=k, allowed=allowed, rollup=rollup, thresholds=thresholds
        )

    run_options = dict(
        batch_size=batch_size, workers=workers, device=device, amp=amp, tta=tta, size=size, backend=backend
    )
    return _run(
        sources,
        model,
        output=output,
        errors_output=errors_output,
        columns_for=columns_for,
        rows_for=rows_for,
        resume=resume,
        chunk_size=chunk_size,
        progress=progress,
        **run_options,
    )


def embed(
    sources,
    model: ModelSpec = DEFAULT_MODEL,
    *,
    output: str | os.PathLike | None = None,
    errors_output: str | os.PathLike | None = None,
    features: Sequence[str] = (),
    batch_size: int = 16,
    workers: int | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
    tta: bool = False,
    size: tuple[int, int] | int | None = None,
    resume: bool = False,
    chunk_size: int = 256,
    progress: bool = True,
    backend: str = "torch",
) -> RunSummary:
    """Embeddings (float32, e.g. 768-d) of every image, with optional spatially pooled stage features, to
    `output` (.parquet: columns path, embedding, stageN; .npy: see hierax.inference.writers) or summary.rows."""
    if output is not None and Path(output).suffix.lower() not in writers.EMBEDDING_FORMATS:
        raise HieraxError(f"embeddings go to .parquet or .npy, not {Path(output).name}")

    def columns_for(info: ModelInfo):
        return ["path", "embedding", *features], None

    def rows_for(result: BatchResult, context) -> list[dict]:
        rows = []
        for i, path in enumerate(result.paths):
            row = {"path": path, "embedding": result.embeddings[i]}
            row.update({name: result.features[name][i] for name in features})
            rows.append(row)
        return rows

    run_options = dict(
        batch_size=batch_size, workers=workers, device=device, amp=amp, tta=tta, size=size, backend=backend
    )
    return _run(
        sources,
        model,
        output=output,
        errors_output=errors_output,
        columns_for=columns_for,
        rows_for=rows_for,
        resume=resume,
        chunk_size=chunk_size,
        progress=progress,
        return_embedding=True,
        features=list(features),
        **run_options,
    )
