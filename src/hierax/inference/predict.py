"""Batch prediction and embedding over many files: `predict(...)` and `embed(...)`, which the CLI wraps.

sources -> DataLoader (decode + resize in workers, errors as values; `loading`) -> `iter_predictions` (batched
forward via `infer_batch`, amp, tta) -> rows (probability steps, top-k, taxonomy, roll-up; `rows`) -> chunked
writers. Bad files become rows of the errors file; they never stop the run. Under torchrun (WORLD_SIZE > 1)
every rank takes an interleaved shard of the inputs and writes its own part, which rank 0 merges (`sharding`).
`model` is a registry name, a checkpoint path, or an already loaded `(net, info)` pair.

Everything that can be checked is checked before a model is loaded or a file written: options, the output
format, a location prior's file, that the inputs hold images, then (with the model) that it has a classifier, the
species list, that the prior shares classes with it and that the user's species were fitted on its embeddings.

Where and when (`geo_prior`): each image's place and date come from `location` / `date` (run-wide), else the
input CSV's latitude/longitude/date columns, else its EXIF (read in the loader's workers from the bytes that are
decoded); see hierax.inference.place. Species of the user's own and "unknown" (`open_set`): see
hierax.inference.rows (the prior re-weights the model's classes first; the user's species then share the list).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hierax.data.metadata import Overrides
from hierax.data.sources import find_image_rows
from hierax.data.taxonomy import Taxonomy
from hierax.distributed import close_distributed
from hierax.errors import HieraxError
from hierax.geo import GeoPrior
from hierax.inference import formats, writers
from hierax.inference.classification import check_stages, device_and_dtype
from hierax.inference.loading import (
    BatchResult,
    ModelSpec,
    iter_predictions,
    make_loader,
    model_label,
    resolve_model,
)
from hierax.inference.outputs import RunOutputs, default_errors_path
from hierax.inference.place import GeoStep, PlaceTally, load_geo_prior, prior_for_model
from hierax.inference.rows import EmbeddingRows, OpenSetRule, PredictionRows
from hierax.inference.sharding import Shards, join_ranks
from hierax.interchange.xmp import SidecarWriter
from hierax.sizes import check_size
from hierax.transforms import classification_transform
from hierax.weights.catalog import DEFAULT_MODEL
from hierax.weights.files import ModelInfo, require_classifier

logger = logging.getLogger(__name__)

RowsFor = Callable[[BatchResult], list[dict]]


@dataclass
class RunSummary:
    """What a predict / embed run did. `seconds` is the image loop (decode, forward, write, merge) and
    `load_seconds` the model's loading before it (an export on a backend's first run included), so images/s
    counts images only. Without an output file, `rows` holds the results and `errors` the (path, reason) of
    every failed image. With a location prior, `located` counts the images that had a place and
    `place_warnings` those whose place or date metadata was broken (ignored, and named in the log)."""

    total: int
    succeeded: int
    failed: int
    skipped: int
    seconds: float
    output: Path | None = None
    errors_output: Path | None = None
    rows: list[dict] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    load_seconds: float = 0.0
    located: int | None = None
    place_warnings: int = 0

    @property
    def images_per_s(self) -> float:
        return (self.succeeded + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        text = f"{self.succeeded} ok, {self.failed} failed"
        if self.skipped:
            text += f", {self.skipped} skipped (already done)"
        text += f" of {self.total} images in {self.seconds:.1f} s ({self.images_per_s:.2f} images/s"
        text += f"; model loaded in {self.load_seconds:.1f} s)"
        if self.located is not None:
            text += f"; geo prior applied to {self.located} of {self.succeeded} (the others have no location)"
        if self.place_warnings:
            text += f", {self.place_warnings} with broken location or date metadata (ignored, see the log)"
        if self.output:
            text += f" -> {self.output}"
        if self.failed and self.errors_output:
            text += f"; errors in {self.errors_output}"
        return text


@dataclass
class _Job:
    """What predict and embed hand the shared loop: how to build rows for a model (given the spec, net and info
    it loaded; checks that need the model go there), what to compute, and whether the loader reads where and
    when each image was taken (`capture`: the run-wide overrides) for a tally of it."""

    rows_for_model: Callable[[ModelSpec, object, ModelInfo], tuple[list[str], RowsFor]]
    return_embedding: bool = False
    features: Sequence[str] = ()
    capture: Overrides | None = None
    tally: PlaceTally | None = None
    xmp: bool = False


def _write_results(
    results: Iterable[BatchResult], rows_for: RowsFor, outputs: RunOutputs, tally: PlaceTally | None = None
) -> tuple[int, int]:
    """Rows of every batch to `outputs`; (succeeded, failed). The files are published when every batch is done,
    and kept unpublished for --resume when the loop ends early (an error, Ctrl-C)."""
    succeeded = failed = 0
    ok = False
    try:
        for result in results:
            rows = rows_for(result) if result.paths else []
            if tally is not None:
                tally.add(result)
            outputs.add(result, rows)
            succeeded += len(rows)
            failed += len(result.errors)
        ok = True
    finally:
        outputs.finish(ok)
    return succeeded, failed


def _run(
    sources,
    model: ModelSpec,
    job: _Job,
    *,
    output: str | os.PathLike | None,
    errors_output: str | os.PathLike | None,
    batch_size: int,
    workers: int | None,
    device: str | torch.device | None,
    amp: bool,
    tta: bool,
    size,
    resume: bool,
    chunk_size: int,
    progress: bool,
    backend: str = "torch",
) -> RunSummary:
    """The loop shared by predict and embed: sources -> loader -> forward -> rows -> writers, sharded by rank."""
    # --- checks that need no model: options, output format, inputs ---
    size = check_size(size) if size is not None else None
    output = Path(output) if output is not None else None
    if output is not None:
        formats.check_format(output)
    errors_path = Path(errors_output) if errors_output else (default_errors_path(output) if output else None)
    paths, csv_rows = find_image_rows(sources)
    ddp = join_ranks()
    try:
        shards = Shards.plan(ddp, output, errors_path)
        # --- the model, and the checks that need it ---
        start = time.perf_counter()
        net, info = resolve_model(model, device=device, size=size, backend=backend)
        columns, rows_for = job.rows_for_model(model, net, info)
        load_seconds = time.perf_counter() - start
        # --- this rank's share of what is left to do ---
        start = time.perf_counter()
        todo = list(range(len(paths)))
        if resume:
            done = shards.done_paths()
            todo = [i for i in todo if paths[i] not in done]
        mine = shards.take(todo)
        pin = device_and_dtype(net)[0].type == "cuda"
        transform = classification_transform(info.size, info.rgb_stats)
        # per-path CSV columns travel to the workers only when some row has any and the job reads places
        meta = [csv_rows[i] for i in mine] if job.capture is not None and any(csv_rows) else None
        loader = make_loader(
            [paths[i] for i in mine],
            transform,
            batch_size=batch_size,
            workers=workers,
            meta=meta,
            capture=job.capture,
            pin_memory=pin,
        )
        # --- the image loop: rows to this rank's writer (or memory), failures to its errors file ---
        my_output, my_errors = shards.my_output(), shards.my_errors()
        outputs = RunOutputs(
            writers.open_writer(my_output, columns, resume=resume, chunk_size=chunk_size) if my_output else None,
            writers.ErrorsWriter(my_errors) if my_errors else None,
            sidecars=SidecarWriter(Taxonomy(info.class_names), model=model_label(model, info)) if job.xmp else None,
        )
        results = iter_predictions(
            net,
            loader,
            amp=amp,
            tta=tta,
            return_embedding=job.return_embedding,
            features=job.features,
            progress=progress and shards.is_main,
            total=len(mine),
        )
        tally = job.tally
        succeeded, failed = _write_results(results, rows_for, outputs, tally)
        located, warned = (tally.located, tally.warned) if tally is not None else (0, 0)
        # --- the ranks' parts become one output ---
        if shards.sharded:
            succeeded, failed, located, warned = shards.total(succeeded, failed, located, warned)
            shards.merge(columns, paths, resume=resume)
        seconds = time.perf_counter() - start
        summary = RunSummary(len(paths), succeeded, failed, len(paths) - len(todo), seconds, output, errors_path)
        summary.rows, summary.errors, summary.load_seconds = outputs.rows, outputs.failures, load_seconds
        if tally is not None:
            summary.located, summary.place_warnings = located, warned
        logger.debug("%s", summary.line())
        return summary
    finally:
        close_distributed(ddp)


def _check_options(rollup: bool, species_list, geo_prior, open_set: OpenSetRule | None, overrides: Overrides):
    """Combinations of options that cannot work, refused before anything loads."""
    if (overrides.has_location or overrides.date is not None) and geo_prior is None:
        raise HieraxError("--location and --date feed the location prior: give --geo-prior PRIOR as well")
    if open_set is None or not open_set.only_extra:
        return
    for given, option in ((rollup, "--rollup"), (species_list, "--species-list"), (geo_prior, "--geo-prior")):
        if given:
            raise HieraxError(f"{option} works on the model's classes, which --only-extra leaves out")


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
    geo_prior: str | os.PathLike | GeoPrior | None = None,
    location: Sequence[float] | None = None,
    date: str | None = None,
    open_set: OpenSetRule | None = None,
    chunk_size: int = 256,
    progress: bool = True,
    backend: str = "torch",
    xmp: bool = False,
) -> RunSummary:
    """Classify every image named by `sources`; rows go to `output` (.csv/.jsonl/.parquet) or summary.rows.

    common_names: JSON index -> name, or an iNat21 annotation JSON. species_list: a file or a list of entries
    (class names, binomials, common names) that predictions are restricted to and renormalised over; only they
    fill the top-k columns. rollup: add the deepest rank whose summed probability passes `thresholds` (species
    0.8, genus 0.6, family 0.4 by default). geo_prior: a prior file (`hierax geoprior fit`) or GeoPrior that
    re-weights each image by its place and date; location (LAT, LON) and date (YYYY-MM-DD) override every
    image's own. open_set: species of the user's own and an unknown threshold
    (`hierax.similar.OpenSet.load(FILE, only_extra=..., threshold=...)`). backend: torch, onnxruntime or
    torchscript (see hierax.weights.load.load_with_backend). xmp: write or update each photo's XMP sidecar with its
    answer (hierax.interchange.xmp); a sidecar that cannot be written goes to the errors file."""
    if top_k < 1:
        raise HieraxError("top_k must be at least 1")
    overrides = Overrides.from_args(location, date)
    _check_options(rollup, species_list, geo_prior, open_set, overrides)
    prior = load_geo_prior(geo_prior) if geo_prior is not None else None

    def rows_for_model(spec: ModelSpec, net, info: ModelInfo) -> tuple[list[str], RowsFor]:
        require_classifier(info, "predict species")
        if open_set is not None:
            open_set.check_model(spec, net, info, tta=tta)
        rows = PredictionRows.for_model(
            info,
            top_k=top_k,
            common_names=common_names,
            species_list=species_list,
            rollup=rollup,
            thresholds=thresholds,
            geo_step=GeoStep(prior_for_model(prior, info)) if prior is not None else None,
            open_set=open_set,
        )
        return rows.columns, rows

    job = _Job(
        rows_for_model,
        return_embedding=open_set is not None and open_set.needs_embeddings,
        capture=overrides if prior is not None else None,
        tally=PlaceTally() if prior is not None else None,
        xmp=xmp,
    )
    run_options = dict(
        batch_size=batch_size, workers=workers, device=device, amp=amp, tta=tta, size=size, backend=backend
    )
    return _run(
        sources,
        model,
        job,
        output=output,
        errors_output=errors_output,
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
    if output is not None and Path(output).suffix.lower() not in formats.EMBEDDING_FORMATS:
        raise HieraxError(f"embeddings go to .parquet or .npy, not {Path(output).name}")
    rows = EmbeddingRows(check_stages(features))

    run_options = dict(
        batch_size=batch_size, workers=workers, device=device, amp=amp, tta=tta, size=size, backend=backend
    )
    return _run(
        sources,
        model,
        _Job(lambda *_: (rows.columns, rows), return_embedding=True, features=rows.features),
        output=output,
        errors_output=errors_output,
        resume=resume,
        chunk_size=chunk_size,
        progress=progress,
        **run_options,
    )
