"""The end of a detections run (hierax.inference.detections), on rank 0 with every result in hand: capture
times, events, the per-image summary and the MegaDetector JSON, and the summary the run returns.

Where the files go (`table_paths`): beside `OUT.csv` / `.jsonl` / `.parquet` (the detection rows) come
`OUT.images<suffix>` and `OUT.events<suffix>`; beside `OUT.json` comes `OUT.events.csv` (the JSON has every
image). Capture times: EXIF (read in the workers) > a time the detections file recorded > the file's
modification time (time_source "file").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path

from hierax.data.boxes import FrameBoxes
from hierax.data.crops import CropPolicy
from hierax.data.metadata import Overrides
from hierax.geo import GeoPrior
from hierax.inference import formats
from hierax.inference.predict import RunSummary
from hierax.inference.rows import PredictionRows
from hierax.interchange.classified import write_classified
from hierax.interchange.events import (
    CaptureTime,
    camera_of,
    capture_times,
    event_columns,
    event_rows,
    group_events,
    summarise_events,
)
from hierax.interchange.megadetector import DetectionsFile, local_path
from hierax.interchange.results import Classification
from hierax.interchange.rows import summary_columns, summary_rows
from hierax.weights.files import ModelInfo

Results = dict[tuple[int, int], Classification]


@dataclass
class DetectionsSummary(RunSummary):
    """What a detections run did. `total` counts the images of the detections file, `succeeded` / `failed` the
    frames this run read or could not read, `skipped` the frames an earlier run classified (--resume) and
    `crops` the boxes this run classified; `images_per_s` is frames/s. Without an output file, `rows`,
    `images` and `events` hold the three tables."""

    crops: int = 0
    images_output: Path | None = None
    events_output: Path | None = None
    images: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)

    @property
    def crops_per_s(self) -> float:
        return self.crops / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        text = f"{self.crops} boxes classified; {self.succeeded} images ok, {self.failed} failed"
        if self.skipped:
            text += f", {self.skipped} skipped (already done)"
        text += f" of {self.total} in {self.seconds:.1f} s ({self.images_per_s:.2f} images/s, "
        text += f"{self.crops_per_s:.2f} crops/s; model loaded in {self.load_seconds:.1f} s)"
        extra = [p for p in (self.images_output, self.events_output) if p is not None]
        if self.output:
            text += f" -> {self.output}" + "".join(f", {p.name}" for p in extra)
        if self.failed and self.errors_output:
            text += f"; errors in {self.errors_output}"
        return text


def table_paths(output: str | os.PathLike) -> tuple[Path | None, Path]:
    """Where the image summary and the events table go beside `output`: `<stem>.images<suffix>` and
    `<stem>.events<suffix>`; beside a .json only `<stem>.events.csv` (the JSON itself has every image)."""
    output = Path(output)
    if formats.suffix_of(output) == ".json":
        return None, output.with_name(f"{output.stem}.events.csv")
    return output.with_name(f"{output.stem}.images{output.suffix}"), output.with_name(
        f"{output.stem}.events{output.suffix}"
    )


@dataclass
class DetectionPlan:
    """Everything checked before a model loads: the detections file, the frames and boxes, the run's options."""

    md: DetectionsFile
    root: str
    frames: list[FrameBoxes]
    threshold: float
    categories: list[str]
    policy: CropPolicy
    overrides: Overrides
    event_gap: float
    output: Path | None
    errors: Path | None
    prior: GeoPrior | None
    prior_name: str = ""

    @property
    def as_json(self) -> bool:
        return self.output is not None and formats.suffix_of(self.output) == ".json"


def _capture_times(plan: DetectionPlan, captures: Mapping[int, dict | None]) -> list[CaptureTime]:
    """Each frame's time: EXIF (read in the workers), else what the detections file recorded, else the file's."""
    times: list[CaptureTime | None] = []
    for f in plan.md.frames:
        exif = (captures.get(f.index) or {}).get("time")
        recorded = f.capture if f.capture is not None and f.capture.time is not None else None
        times.append(CaptureTime(exif, "exif") if exif is not None else recorded)
    missing = [i for i, t in enumerate(times) if t is None]
    files = capture_times([local_path(plan.root, plan.md.frames[i].file) for i in missing])
    for i, t in zip(missing, files):
        times[i] = t
    return times  # type: ignore[return-value]


def _metadata(plan: DetectionPlan, rows: PredictionRows, info: ModelInfo, label: str, tta: bool, events: Path) -> dict:
    """info.classifier_metadata of the JSON: the settings `hierax camtrapdp` and a reader need."""
    meta = {
        "model": label,
        "hierax_version": package_version("hierax"),
        "detection_threshold": plan.threshold,
        "classify_categories": plan.categories,
        "crop": str(plan.policy),
        "input_size": list(info.size),
        "tta": tta,
        "top_k": rows.k,
        "event_gap_s": plan.event_gap,
        "events_file": events.name,
    }
    if rows.rollup:
        meta["rollup_thresholds"] = rows.thresholds
    if rows.candidates is not None:
        meta["species_list_classes"] = len(rows.candidates)
    if plan.prior_name:
        meta["geo_prior"] = plan.prior_name
    return meta


def write_tables(
    plan: DetectionPlan,
    rows: PredictionRows,
    results: Results,
    failures: Mapping[int, str],
    captures: Mapping[int, dict | None],
    *,
    label: str,
    info: ModelInfo,
    tta: bool,
) -> tuple[list[dict], list[dict], Path | None, Path | None]:
    """Rank 0, every result in hand: events, the image summary and (with an output) the files; returns
    (image rows, event rows, images path, events path)."""
    md, taxonomy, k = plan.md, rows.taxonomy, rows.k
    times = _capture_times(plan, captures)
    events = group_events([camera_of(f.file) for f in md.frames], times, gap_s=plan.event_gap)
    per_frame: dict[int, list] = {}
    for (i, j), c in sorted(results.items()):
        per_frame.setdefault(i, []).append((md.frames[i].detections[j].conf, c))
    summaries = summarise_events(events, per_frame, taxonomy, k=k, rollup=rows.rollup, thresholds=rows.thresholds)
    event_table = event_rows(summaries, taxonomy, k)
    images = summary_rows(
        md, results, taxonomy, root=plan.root, threshold=plan.threshold, failures=failures, events=events
    )
    if plan.output is None:
        return images, event_table, None, None
    images_path, events_path = table_paths(plan.output)
    if plan.as_json:
        meta = _metadata(plan, rows, info, label, tta, events_path)
        write_classified(
            plan.output,
            md,
            results,
            taxonomy,
            failures=failures,
            times=times,
            classifier=f"hierax {label}",
            classifier_metadata=meta,
        )
    else:
        formats.write_all(images_path, images, summary_columns(md, events=True))
    formats.write_all(events_path, event_table, event_columns(k))
    return images, event_table, images_path, events_path
