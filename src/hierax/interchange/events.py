"""Events: camera-trap frames grouped per camera (folder) by capture time, and one answer per event.

API:
    CaptureTime(time, source): a frame's capture time (a datetime, or None) and where it came from: the caller's
        reader ("exif" for EXIF DateTimeOriginal), "file" (the file's modification time, a flagged fallback) or
        "" (unknown).
    capture_times(paths, times=None, *, file_time_fallback=True) -> list[CaptureTime]
        `times` are the capture times a metadata reader found (datetime or None per path); a missing one falls
        back to the file's modification time (local time, as cameras write EXIF times) when allowed.
    camera_of(file) -> str: the folder of a frame's path, "/"-separated ("" at the top level): one camera.
    group_events(cameras, times, *, gap_s=DEFAULT_EVENT_GAP_S) -> list[Event]
        Per camera, frames sorted by time; a new event starts when a frame comes more than gap_s after the previous
        one. A frame without a time is an event of its own.
    summarise_events(events, detections, taxonomy, *, k=5, rollup=False, thresholds=None) -> list[EventSummary]
        `detections` maps a frame index to its classified detections as (detection confidence, Classification).
    event_columns(k), event_rows(summaries) -> rows for hierax.inference.writers.
    parse_utc_offset("+02:00") -> datetime.timezone: a fixed time zone for naive capture times.

Rules (and why):
- Gap 60 s by default. One trigger gives a burst of frames a second or so apart and an animal that stays
  re-triggers the camera within seconds to tens of seconds, while a minute without a frame usually means it has
  gone; TrapTagger clusters a site's images within one minute the same way. Longer "independence" intervals
  (30 min, 1 h) are for occupancy statistics, not for grouping frames; pass gap_s for those.
- Species: the mean of the event's per-detection probability vectors, weighted by detection confidence, then
  top-k and the roll-up on that mean. A mean of probability vectors is itself one, so the roll-up thresholds mean
  what they mean for a single photo; the weights let sure, usually larger and sharper boxes count more than
  dubious ones; a maximum would let one over-confident wrong crop decide, and a product (summed log
  probabilities) treats frames of one burst as independent evidence and becomes over-confident. Each detection
  contributes its top-k (what the output files keep); the mass outside them is left unassigned, which keeps the
  roll-up conservative.
- Count: the largest number of classified detections in one frame of the event (the usual "minimum number of
  individuals" of a sequence; the same animal in successive frames is not counted twice).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hierax.data.taxonomy import Taxonomy
from hierax.errors import HieraxError
from hierax.interchange.results import Answer, Classification, answer, classify

DEFAULT_EVENT_GAP_S = 60.0


@dataclass(frozen=True)
class CaptureTime:
    """When a frame was taken and where that came from ("exif", "file" or "" when unknown)."""

    time: dt.datetime | None
    source: str = ""


@dataclass(frozen=True)
class Event:
    """Frames of one camera taken close together: frame indices in time order, first and last time."""

    id: str
    camera: str
    frames: tuple[int, ...]
    start: dt.datetime | None
    end: dt.datetime | None
    time_source: str


@dataclass(frozen=True)
class EventSummary:
    """An event's combined classification, its answer, the detections it rests on and the individuals counted."""

    event: Event
    classification: Classification | None
    answer: Answer | None
    detections: int
    count: int


def file_time(path: str | os.PathLike) -> dt.datetime | None:
    """The file's modification time as a naive local datetime, or None when it cannot be read."""
    try:
        return dt.datetime.fromtimestamp(os.stat(path).st_mtime).replace(microsecond=0)
    except (OSError, ValueError, OverflowError):
        return None


def parse_utc_offset(text: str) -> dt.timezone:
    """'+02:00', '-0530', 'Z' or 'UTC' as a fixed time zone."""
    match = re.fullmatch(r"([+-])(\d{1,2}):?(\d{2})?", text.strip())
    if text.strip().upper() in ("Z", "UTC"):
        return dt.UTC
    if not match:
        raise HieraxError(f"bad UTC offset '{text}': use +HH:MM or -HH:MM, e.g. +02:00")
    sign = 1 if match.group(1) == "+" else -1
    hours, minutes = int(match.group(2)), int(match.group(3) or 0)
    if hours > 14 or minutes > 59:
        raise HieraxError(f"bad UTC offset '{text}': at most +-14:00")
    return dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))


def capture_times(
    paths: Sequence[str | os.PathLike],
    times: Sequence[dt.datetime | None] | None = None,
    *,
    source: str = "exif",
    file_time_fallback: bool = True,
) -> list[CaptureTime]:
    """One CaptureTime per path: the given time (marked `source`), else the file time (marked "file")."""
    if times is not None and len(times) != len(paths):
        raise ValueError(f"{len(paths)} paths but {len(times)} capture times")
    out = []
    for i, path in enumerate(paths):
        given = times[i] if times is not None else None
        if given is not None:
            out.append(CaptureTime(given, source))
            continue
        fallback = file_time(path) if file_time_fallback else None
        out.append(CaptureTime(fallback, "file" if fallback is not None else ""))
    return out


def camera_of(file: str) -> str:
    """The folder part of a frame's path ("/"-separated; backslashes count as separators), "" at the top level."""
    parts = file.replace("\\", "/").rsplit("/", 1)
    return parts[0] if len(parts) == 2 else ""


def _comparable(time: dt.datetime) -> dt.datetime:
    """Aware and naive times side by side: aware ones compare in UTC, naive ones as they are."""
    return time.astimezone(dt.UTC).replace(tzinfo=None) if time.tzinfo is not None else time


def group_events(
    cameras: Sequence[str], times: Sequence[CaptureTime], *, gap_s: float = DEFAULT_EVENT_GAP_S
) -> list[Event]:
    """Events over frames 0..N-1 (see the module docstring); ordered by camera, then time."""
    if len(cameras) != len(times):
        raise ValueError(f"{len(cameras)} cameras but {len(times)} capture times")
    if gap_s < 0:
        raise ValueError(f"the event gap must be at least 0 s, got {gap_s}")
    gap = dt.timedelta(seconds=gap_s)
    by_camera: dict[str, list[int]] = {}
    for i, camera in enumerate(cameras):
        by_camera.setdefault(camera, []).append(i)
    groups: list[tuple[str, list[int]]] = []
    for camera in sorted(by_camera):
        timed = sorted(
            (i for i in by_camera[camera] if times[i].time is not None), key=lambda i: (_comparable(times[i].time), i)
        )
        current: list[int] = []
        for i in timed:
            if current and _comparable(times[i].time) - _comparable(times[current[-1]].time) > gap:
                groups.append((camera, current))
                current = []
            current.append(i)
        if current:
            groups.append((camera, current))
        groups.extend((camera, [i]) for i in by_camera[camera] if times[i].time is None)
    events = []
    for n, (camera, frames) in enumerate(groups):
        sources = {times[i].source for i in frames}
        source = "" if "" in sources else "file" if "file" in sources else min(sources)
        start, end = times[frames[0]].time, times[frames[-1]].time
        events.append(Event(f"event{n + 1:06d}", camera, tuple(frames), start, end, source))
    return events


def combine(detections: Sequence[tuple[float, Classification]], num_classes: int) -> np.ndarray:
    """The confidence-weighted mean of the detections' (top-k, sparse) probability vectors, as a dense (C,)."""
    total = np.zeros(num_classes, dtype=np.float64)
    weight = 0.0
    for conf, c in detections:
        w = max(float(conf), 1e-6)
        np.add.at(total, np.array(c.indices, dtype=np.int64), w * np.array(c.probs, dtype=np.float64))
        weight += w
    return total / weight if weight > 0 else total


def summarise_events(
    events: Sequence[Event],
    detections: Mapping[int, Sequence[tuple[float, Classification]]],
    taxonomy: Taxonomy,
    *,
    k: int = 5,
    rollup: bool = False,
    thresholds: Mapping[str, float] | None = None,
) -> list[EventSummary]:
    """Each event's combined species, answer and count (see the module docstring for the rules)."""
    summaries = []
    for event in events:
        found = [d for i in event.frames for d in detections.get(i, ())]
        if not found:
            summaries.append(EventSummary(event, None, None, 0, 0))
            continue
        mean = combine(found, len(taxonomy))
        (c,) = classify(mean[None, :], taxonomy, k=k, rollup=rollup, thresholds=thresholds)
        count = max(len(detections.get(i, ())) for i in event.frames)
        summaries.append(EventSummary(event, c, answer(c, taxonomy), len(found), count))
    return summaries


def event_columns(k: int) -> list[str]:
    """Columns of the events table."""
    columns = ["event_id", "camera", "start", "end", "frames", "time_source", "detections", "count"]
    columns += ["name", "rank", "probability", "common_name"]
    for i in range(1, k + 1):
        columns += [f"label_{i}", f"prob_{i}"]
    return columns


def _iso(time: dt.datetime | None) -> str:
    return time.isoformat() if time is not None else ""


def event_rows(summaries: Sequence[EventSummary], taxonomy: Taxonomy, k: int) -> list[dict]:
    """One row per event: camera, times, frames, detections, count and the combined answer with its top-k."""
    rows = []
    for s in summaries:
        e = s.event
        row = {
            "event_id": e.id,
            "camera": e.camera,
            "start": _iso(e.start),
            "end": _iso(e.end),
            "frames": len(e.frames),
            "time_source": e.time_source,
            "detections": s.detections,
            "count": s.count,
        }
        a = s.answer
        row.update(
            name=a.name if a else "",
            rank=a.rank if a else "",
            probability=round(a.probability, 6) if a else None,
            common_name=a.common_name if a else "",
        )
        for i in range(k):
            has = s.classification is not None and i < len(s.classification.indices)
            row[f"label_{i + 1}"] = taxonomy.class_names[s.classification.indices[i]] if has else ""
            row[f"prob_{i + 1}"] = round(s.classification.probs[i], 6) if has else None
        rows.append(row)
    return rows
