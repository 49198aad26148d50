"""Camera-trap batch jobs: every box of a MegaDetector file classified, `predict_detections(...)`, the library
behind `hierax predict ROOT --detections MD.json`.

A thin sibling of hierax.inference.predict: the same model loading, forward pass (iter_predictions), probability
steps, top-k and roll-up (PredictionRows, classify), chunked writers, errors file and torchrun sharding, over a
CropDataset that decodes each frame once in the workers, cuts out every selected box and reads the frame's EXIF
capture time and place.

Outputs, by the suffix of `output`:
- `.json`: the MegaDetector file with hierax's classifications (hierax.interchange.classified.write_classified),
  every input image kept, a failure entry for each frame that could not be read; written once, at the end of the
  run (so no --resume). Beside it `<stem>.events.csv`.
- `.csv`, `.jsonl`, `.parquet`: one row per classified detection (hierax.interchange.rows.detection_columns),
  written in chunks and resumable; beside it `<stem>.images<suffix>` (one summary row per image) and
  `<stem>.events<suffix>` (one row per event), both rewritten from every result at the end of each run.
- none: the detection rows, image summaries and events in the returned summary.
And `<stem>.errors.csv` for frames that could not be read and XMP sidecars that could not be written.

Events group frames per folder by capture time: EXIF DateTimeOriginal read in the workers, else a time the
detections file recorded, else the file's modification time (time_source "file"); hierax.interchange.events has
the rules. A geo prior re-weights each crop at its frame's place and date (EXIF GPS and date, or `location` /
`date` for the whole run). Under torchrun each rank takes an interleaved share of the frames and writes its own
part of the detection rows; the results are gathered on rank 0, which writes the JSON, image summary and events.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from hierax.data.boxes import FrameBoxes
from hierax.data.crops import CropDataset, CropPolicy, fill_from_stats, make_crop_loader
from hierax.data.datasets import default_workers
from hierax.data.metadata import Overrides
from hierax.data.taxonomy import Taxonomy
from hierax.distributed import DistInfo, close_distributed
from hierax.errors import HieraxError
from hierax.geo import load_prior
from hierax.inference import formats, writers
from hierax.inference.classification import device_and_dtype
from hierax.inference.detection_tables import DetectionPlan, DetectionsSummary, write_tables
from hierax.inference.loading import (
    BatchResult,
    ModelSpec,
    _yield_to_the_model,
    iter_predictions,
    model_label,
    resolve_model,
)
from hierax.inference.outputs import RunOutputs, default_errors_path
from hierax.inference.place import GeoStep, prior_for_model
from hierax.inference.rows import PredictionRows
from hierax.inference.sharding import Shards, join_ranks, shard_name
from hierax.interchange.events import (
    DEFAULT_EVENT_GAP_S,
)
from hierax.interchange.megadetector import (
    category_ids,
    default_threshold,
    read_detections,
    select_detections,
)
from hierax.interchange.results import Classification, answer, classify
from hierax.interchange.rows import (
    detection_columns,
    detection_rows,
    read_detection_rows,
)
from hierax.interchange.xmp import SidecarWriter
from hierax.sizes import check_size
from hierax.transforms import classification_transform
from hierax.weights.catalog import DEFAULT_MODEL
from hierax.weights.files import ModelInfo, require_classifier

DEFAULT_CROP = str(CropPolicy())
OUTPUT_FORMATS = (".json", *formats.ROW_FORMATS)
Results = dict[tuple[int, int], Classification]

logger = logging.getLogger(__name__)


class _Classifier:
    """Crop probabilities -> plain predict's probability steps (the species list, then the geo prior at each crop's
    frame) -> top-k and roll-up."""

    def __init__(self, rows: PredictionRows) -> None:
        self.rows = rows

    def __call__(self, result: BatchResult) -> list[Classification]:
        probs = self.rows.probabilities(result)
        r = self.rows
        return classify(probs, r.taxonomy, k=r.k, allowed=r.candidates, rollup=r.rollup, thresholds=r.thresholds)


class _Captures:
    """The loader as iter_predictions reads it, keeping every frame's capture metadata on the way (frames without
    crops included, which no BatchResult names)."""

    def __init__(self, loader: Iterable[dict]) -> None:
        self.loader = loader
        self.found: dict[int, dict | None] = {}

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            self.found.update(batch["captures"])
            yield batch


def _plan(
    root,
    detections,
    *,
    output,
    errors_output,
    threshold,
    categories,
    crop,
    event_gap,
    resume,
    location,
    date,
    geo_prior,
) -> DetectionPlan:
    """The checks that need no model (see predict_detections)."""
    output = Path(output) if output is not None else None
    if output is not None:
        formats.check_format(output, OUTPUT_FORMATS)
    if resume and (output is None or formats.suffix_of(output) == ".json"):
        raise HieraxError(
            "--resume continues a .csv, .jsonl or .parquet detections table; a .json is written once, at the end"
        )
    if not event_gap >= 0:
        raise HieraxError(f"the event gap must be at least 0 seconds, got {event_gap}")
    policy = crop if isinstance(crop, CropPolicy) else CropPolicy.parse(crop)
    overrides = Overrides.from_args(location, date)
    if not os.path.isdir(root):
        raise HieraxError(f"{root} is not a folder: give the folder that the detections file's paths start from")
    md = read_detections(detections)
    threshold = default_threshold(md) if threshold is None else float(threshold)
    frames = select_detections(md, root, threshold=threshold, categories=categories, keep_empty=True)
    names = [md.detection_categories[c] for c in sorted(category_ids(md, categories), key=int)]
    errors = Path(errors_output) if errors_output else (default_errors_path(output) if output else None)
    prior = load_prior(geo_prior) if geo_prior is not None else None
    prior_name = os.path.basename(os.fspath(geo_prior)) if geo_prior is not None else ""
    return DetectionPlan(
        md, os.fspath(root), frames, threshold, names, policy, overrides, event_gap, output, errors, prior, prior_name
    )


def _done(shards: Shards, plan: DetectionPlan, rows: PredictionRows) -> Results:
    """The classifications an earlier run wrote to the output or to any rank's part (for --resume)."""
    parts = [shard_name(plan.output, r) for r in range(shards.ddp.world_size)] if shards.sharded else []
    found = [row for path in (plan.output, *parts) for row in writers.done_rows(path)]
    return read_detection_rows(plan.md, found, rows.taxonomy)


def _resumed(frames: Sequence[FrameBoxes], done: Mapping) -> tuple[list[FrameBoxes], set[int]]:
    """The frames to run: those whose every box an earlier run classified keep no boxes (only their capture is
    read again); and the indices of those frames."""
    todo, skipped = [], set()
    for f in frames:
        if f.boxes and all((f.frame, d) in done for d, _ in f.boxes):
            todo.append(FrameBoxes(f.frame, f.path, ()))
            skipped.add(f.frame)
        else:
            todo.append(f)
    return todo, skipped


def _run_frames(
    plan: DetectionPlan,
    mine: Sequence[FrameBoxes],
    net: torch.nn.Module,
    info: ModelInfo,
    classifier: _Classifier,
    outputs: RunOutputs,
    *,
    batch_size: int,
    workers: int | None,
    amp: bool,
    tta: bool,
    progress: bool,
) -> tuple[Results, dict[int, str], dict[int, dict | None]]:
    """Classify the boxes of this rank's frames, rows and failures to `outputs` as batches finish; (results,
    failures, captures) by frame index."""
    r = classifier.rows
    transform = classification_transform(info.size, info.rgb_stats)
    fill = fill_from_stats(info.rgb_stats)
    dataset = CropDataset(mine, transform, plan.policy, fill, capture=True, overrides=plan.overrides)
    loader = make_crop_loader(
        dataset,
        batch_size=batch_size,
        workers=default_workers() if workers is None else workers,
        pin_memory=device_and_dtype(net)[0].type == "cuda",
        worker_init_fn=_yield_to_the_model,
    )
    captures = _Captures(loader)
    results: Results = {}
    failures: dict[int, str] = {}
    for result in iter_predictions(net, captures, amp=amp, tta=tta, progress=progress, total=dataset.num_crops):
        new = {}
        if result.probs is not None:
            frame_ids, detection_ids = dataset.locate(result.indices)
            new = dict(zip(zip(frame_ids.tolist(), detection_ids.tolist()), classifier(result)))
        frames = sorted({i for i, _ in new})
        table = (
            []
            if plan.as_json
            else detection_rows(plan.md, new, r.taxonomy, root=plan.root, k=r.k, rollup=r.rollup, frames=frames)
        )
        outputs.add(result, table)
        results.update(new)
        failures.update({frame: reason for frame, _, reason in result.errors})
    return results, failures, captures.found


def _sidecars(
    plan: DetectionPlan,
    mine: Sequence[FrameBoxes],
    results: Results,
    failures: Mapping[int, str],
    taxonomy: Taxonomy,
    label: str,
) -> list[tuple[str, str]]:
    """An XMP sidecar for every frame of this rank that was read, one keyword per species found in it."""
    writer = SidecarWriter(taxonomy, model=label)
    failed = []
    for f in mine:
        if f.frame in failures:
            continue
        found = [results.get((f.frame, d.index)) for d in plan.md.frames[f.frame].detections or ()]
        problem = writer.write(f.path, [answer(c, taxonomy) for c in found if c is not None])
        if problem is not None:
            failed.append(problem)
    return failed


def _gather(ddp: DistInfo, *parts: dict) -> list[dict] | None:
    """Each of `parts` merged over the ranks, on rank 0 (None on the others)."""
    gathered = ddp.gather_objects(parts)
    if gathered is None:
        return None
    merged: list[dict] = [{} for _ in parts]
    for rank_parts in gathered:
        for whole, piece in zip(merged, rank_parts):
            whole.update(piece)
    return merged


def predict_detections(
    root: str | os.PathLike,
    detections: str | os.PathLike,
    model: ModelSpec = DEFAULT_MODEL,
    *,
    output: str | os.PathLike | None = None,
    errors_output: str | os.PathLike | None = None,
    threshold: float | None = None,
    categories: Sequence[str] = ("animal",),
    crop: str | CropPolicy = DEFAULT_CROP,
    event_gap: float = DEFAULT_EVENT_GAP_S,
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
    geo_prior: str | os.PathLike | None = None,
    location: Sequence[float] | None = None,
    date: str | None = None,
    xmp: bool = False,
    chunk_size: int = 256,
    progress: bool = True,
    backend: str = "torch",
) -> DetectionsSummary:
    """Classify every box of the MegaDetector file `detections` (images[].file relative to `root`) at or above
    `threshold` (default: the file's typical_detection_threshold, else 0.2) whose category is in `categories`;
    outputs by `output`'s suffix (see the module docstring). crop: 'SHAPE[:CONTEXT[:EDGE]]' (hierax.data.crops).
    event_gap: seconds without a frame that start a new event. geo_prior: a prior file (hierax geoprior fit),
    applied at each frame's EXIF place and date unless `location` (LAT, LON) / `date` (YYYY-MM-DD) are given.
    xmp: each frame's XMP sidecar gets one keyword per species found in it. The other options are plain
    predict's (hierax.inference.predict.predict)."""
    if top_k < 1:
        raise HieraxError("top_k must be at least 1")
    size = check_size(size) if size is not None else None
    plan = _plan(
        root,
        detections,
        output=output,
        errors_output=errors_output,
        threshold=threshold,
        categories=categories,
        crop=crop,
        event_gap=event_gap,
        resume=resume,
        location=location,
        date=date,
        geo_prior=geo_prior,
    )
    ddp = join_ranks()
    try:
        shards = Shards(ddp, None, plan.errors) if plan.as_json else Shards.plan(ddp, plan.output, plan.errors)
        # --- the model, and the checks that need it ---
        start = time.perf_counter()
        net, info = resolve_model(model, device=device, size=size, backend=backend)
        require_classifier(info, "classify detections")
        geo_step = GeoStep(prior_for_model(plan.prior, info)) if plan.prior is not None else None
        rows = PredictionRows.for_model(
            info,
            top_k=top_k,
            common_names=common_names,
            species_list=species_list,
            rollup=rollup,
            thresholds=thresholds,
            geo_step=geo_step,
        )
        classifier = _Classifier(rows)
        label = model_label(model, info)
        load_seconds = time.perf_counter() - start
        # --- this rank's share of the frames; with --resume, frames done before keep no boxes ---
        start = time.perf_counter()
        done = _done(shards, plan, rows) if resume else {}
        todo, skipped = _resumed(plan.frames, done)
        mine = shards.take(todo)
        mine_ids = {f.frame for f in mine}
        results: Results = {key: c for key, c in done.items() if key[0] in mine_ids}
        # --- the frame loop: rows to this rank's writer (or memory), failures to its errors file; sidecars ---
        columns = detection_columns(rows.k, rows.taxonomy, rows.rollup)
        my_output, my_errors = shards.my_output(), shards.my_errors()
        outputs = RunOutputs(
            writers.open_writer(my_output, columns, resume=resume, chunk_size=chunk_size) if my_output else None,
            writers.ErrorsWriter(my_errors) if my_errors else None,
        )
        ok = False
        try:
            new, failures, captures = _run_frames(
                plan,
                mine,
                net,
                info,
                classifier,
                outputs,
                amp=amp,
                tta=tta,
                batch_size=batch_size,
                workers=workers,
                progress=progress and shards.is_main,
            )
            results.update(new)
            if xmp:
                outputs.report(_sidecars(plan, mine, results, failures, rows.taxonomy, label))
            ok = True
        finally:
            outputs.finish(ok)
        # --- every rank's results on rank 0, the ranks' parts merged ---
        mine_skipped = len(skipped & mine_ids)
        counts = torch.tensor([len(mine) - len(failures) - mine_skipped, len(failures), mine_skipped, len(new)])
        counts = ddp.all_reduce_sum(counts).tolist()
        gathered = _gather(ddp, results, failures, captures)
        shards.merge(columns, [f.path for f in plan.frames], resume=resume)
        summary = DetectionsSummary(len(plan.md.frames), *counts[:3], 0.0, plan.output, plan.errors, crops=counts[3])
        # --- rank 0: the JSON, the image summary and the events ---
        if gathered is not None:
            tables = write_tables(plan, rows, *gathered, label=label, info=info, tta=tta)
            summary.images, summary.events, summary.images_output, summary.events_output = tables
        summary.seconds, summary.load_seconds = time.perf_counter() - start, load_seconds
        summary.rows, summary.errors = outputs.rows, outputs.failures
        if geo_step is not None:
            logger.info("geo prior applied to %d of %d crops (those with a place)", geo_step.applied, len(new))
        logger.debug("%s", summary.line())
        return summary
    finally:
        close_distributed(ddp)
