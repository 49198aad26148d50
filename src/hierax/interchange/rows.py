"""Tables of classified detections for hierax.inference.writers (CSV, JSONL, Parquet): one row per classified
detection, and one summary row per image.

API:
    detection_columns(k, taxonomy, rollup) / detection_rows(md, results, taxonomy, *, root, k, rollup)
        path (root joined with file), file (as in the detections file), detection (its index in the image),
        category (detector category name), detection_conf, bbox_x, bbox_y, bbox_width, bbox_height (normalised),
        label_i / prob_i (top-k), the top class's kingdom .. species and common_name (iNat21 classes), and
        rollup_rank / rollup_name / rollup_prob.
    read_detection_rows(md, rows, taxonomy) -> {(frame, detection): Classification}: the classifications of
        detection rows read back (CSV strings or typed values), e.g. those an interrupted run wrote, for --resume.
    summary_columns(md) / summary_rows(md, results, taxonomy, *, root, threshold=None, failures=None, events=None)
        path, file, status (ok, failed, video), one count column per detector category (`n_animal`, `n_person`,
        ... at or above the threshold), classified, species ("name:count;..." of the answers, most frequent
        first), unidentified (classified animals no rank was sure of), blank (no detection at or above the
        threshold), failure, and event_id when events are given.
Inputs: `md` a DetectionsFile (hierax.interchange.megadetector), `results` maps (frame index, detection index) to
a Classification (hierax.interchange.results), `taxonomy` the model's Taxonomy.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence

from hierax.data.taxonomy import RANKS, Rollup, Taxonomy
from hierax.interchange.events import Event
from hierax.interchange.megadetector import DetectionsFile, default_threshold, local_path
from hierax.interchange.results import Classification, answer

Results = Mapping[tuple[int, int], Classification]


def detection_columns(k: int, taxonomy: Taxonomy, rollup: bool) -> list[str]:
    """Columns of the per-detection table (see the module docstring)."""
    columns = [
        "path",
        "file",
        "detection",
        "category",
        "detection_conf",
        "bbox_x",
        "bbox_y",
        "bbox_width",
        "bbox_height",
    ]
    for i in range(1, k + 1):
        columns += [f"label_{i}", f"prob_{i}"]
    if taxonomy.is_taxonomic:
        columns += list(RANKS)
    if taxonomy.is_taxonomic or taxonomy.common_names:
        columns.append("common_name")
    if rollup:
        columns += ["rollup_rank", "rollup_name", "rollup_prob"]
    return columns


def detection_rows(
    md: DetectionsFile,
    results: Results,
    taxonomy: Taxonomy,
    *,
    root: str | os.PathLike,
    k: int,
    rollup: bool,
    frames: Sequence[int] | None = None,
) -> list[dict]:
    """One row per classified detection, in file order (only `frames` when given, e.g. one batch's)."""
    rows = []
    for i in frames if frames is not None else range(len(md.frames)):
        frame = md.frames[i]
        for det in frame.detections or ():
            found = results.get((i, det.index))
            if found is None:
                continue
            row = {
                "path": local_path(root, frame.file),
                "file": frame.file,
                "detection": det.index,
                "category": md.detection_categories[det.category],
                "detection_conf": det.conf,
            }
            row.update(zip(("bbox_x", "bbox_y", "bbox_width", "bbox_height"), det.bbox))
            for j in range(k):
                has = j < len(found.indices)
                row[f"label_{j + 1}"] = taxonomy.class_names[found.indices[j]] if has else ""
                row[f"prob_{j + 1}"] = round(found.probs[j], 6) if has else None
            taxon = taxonomy.taxon(found.top) if taxonomy.is_taxonomic else None
            if taxon is not None:
                row.update(taxon.as_dict())
            if taxonomy.is_taxonomic or taxonomy.common_names:
                row["common_name"] = taxonomy.common_name(found.top)
            if rollup:
                r = found.rollup
                row.update(rollup_rank=r.rank if r else "", rollup_name=r.name if r else "")
                row["rollup_prob"] = round(r.probability, 6) if r else None
            rows.append(row)
    return rows


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_detection_rows(
    md: DetectionsFile, rows: Sequence[Mapping], taxonomy: Taxonomy
) -> dict[tuple[int, int], Classification]:
    """Classifications from detection rows (see the module docstring); rows of other files or classes are skipped."""
    frame_of = {frame.file: frame.index for frame in reversed(md.frames)}
    index_of = {name: i for i, name in enumerate(taxonomy.class_names)}
    found = {}
    for row in rows:
        frame, detection = frame_of.get(str(row.get("file"))), _float(row.get("detection"))
        indices, probs = [], []
        for j in range(1, len(row)):
            label, prob = row.get(f"label_{j}"), _float(row.get(f"prob_{j}"))
            if label is None:
                break
            if label in index_of and prob is not None:
                indices.append(index_of[label])
                probs.append(prob)
        if frame is None or detection is None or not indices:
            continue
        rolled = None
        if "rollup_rank" in row:
            rank, name = str(row.get("rollup_rank") or ""), str(row.get("rollup_name") or "")
            common = taxonomy.common_name(indices[0]) if rank == "species" else ""
            rolled = Rollup(rank, name, _float(row.get("rollup_prob")) or 0.0, common)
        found[(frame, int(detection))] = Classification(tuple(indices), tuple(probs), rolled)
    return found


def _count_column(name: str) -> str:
    return "n_" + "_".join(name.lower().split())


def summary_columns(md: DetectionsFile, *, events: bool = False) -> list[str]:
    """Columns of the per-image summary (see the module docstring)."""
    counts = [_count_column(n) for n in dict.fromkeys(md.detection_categories.values())]
    columns = ["path", "file", "status", *counts, "classified", "species", "unidentified", "blank", "failure"]
    return [*columns, "event_id"] if events else columns


def summary_rows(
    md: DetectionsFile,
    results: Results,
    taxonomy: Taxonomy,
    *,
    root: str | os.PathLike,
    threshold: float | None = None,
    failures: Mapping[int, str] | None = None,
    events: Sequence[Event] | None = None,
) -> list[dict]:
    """One row per image of the detections file: what was found there (see the module docstring)."""
    threshold = default_threshold(md) if threshold is None else threshold
    failures = failures or {}
    event_of = {i: e.id for e in events for i in e.frames} if events is not None else None
    names = list(dict.fromkeys(md.detection_categories.values()))
    rows = []
    for frame in md.frames:
        i = frame.index
        row: dict = {"path": local_path(root, frame.file), "file": frame.file}
        failure = failures.get(i, frame.failure)
        row["status"] = "failed" if failure is not None else "video" if frame.is_video else "ok"
        kept = [d for d in frame.detections or () if d.conf >= threshold] if failure is None else []
        per_category = Counter(md.detection_categories[d.category] for d in kept)
        row.update({_count_column(n): per_category.get(n, 0) for n in names})
        answers = [answer(results[(i, d.index)], taxonomy) for d in frame.detections or () if (i, d.index) in results]
        species = Counter(a.name for a in answers if a.identified)
        row["classified"] = len(answers) if failure is None else 0
        row["species"] = ";".join(f"{n}:{c}" for n, c in species.most_common()) if failure is None else ""
        row["unidentified"] = sum(not a.identified for a in answers) if failure is None else 0
        row["blank"] = None if failure is not None or frame.is_video else not kept
        row["failure"] = failure or ""
        if event_of is not None:
            row["event_id"] = event_of.get(i, "")
        rows.append(row)
    return rows
