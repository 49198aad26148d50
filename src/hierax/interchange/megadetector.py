"""MegaDetector batch-output files (format 1.x): read and check them, pick the boxes to classify.

API:
    read_detections(path) -> DetectionsFile; parse_detections(doc, source) for a loaded JSON object.
        Every problem raises DetectionsFileError naming the entry (images[3] 'cam1/IMG_0004.JPG', detections[1]).
    DetectionsFile: .source, .doc (the JSON object as read), .frames, .detection_categories,
        .classification_categories, .format_version
    Frame: index, file, detections (tuple of Detection, or None for a failed image), failure, is_video, capture
    Detection: index, category, conf, bbox (normalised x_min, y_min, width, height), classifications, rollup
    select_detections(md, root, *, threshold=None, categories=("animal",), keep_empty=False) -> list[FrameBoxes]
        Boxes at or above `threshold` (default: the file's info.detector_metadata.typical_detection_threshold,
        else 0.2) whose category (name or id) is to be classified; person and vehicle pass through untouched.
        Videos are passed through too (hierax classifies still images). Paths are `root` joined with
        images[].file. keep_empty: also the still frames with nothing to classify (no boxes), whose capture
        times events need.
    The classifications hierax writes into such files: hierax.interchange.classified.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hierax.data.boxes import FrameBoxes
from hierax.data.taxonomy import Rollup
from hierax.errors import HieraxError
from hierax.interchange.events import CaptureTime

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1.6"
DEFAULT_DETECTION_THRESHOLD = 0.2
_BOX_TOLERANCE = 0.01
_VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".wmv", ".m4v", ".mpg", ".mpeg", ".asf"})


class DetectionsFileError(HieraxError):
    """A MegaDetector file that cannot be used; the message names the file and the offending entry."""


@dataclass(frozen=True)
class Detection:
    """One box of a frame, as the detector wrote it (plus classifications when a classifier has run)."""

    index: int
    category: str
    conf: float
    bbox: tuple[float, float, float, float]
    classifications: tuple[tuple[str, float], ...] = ()
    rollup: Rollup | None = None


@dataclass(frozen=True)
class Frame:
    """One images[] entry: its file, detections (None when it failed), failure and capture time if given."""

    index: int
    file: str
    detections: tuple[Detection, ...] | None
    failure: str | None
    is_video: bool
    capture: CaptureTime | None = None


@dataclass
class DetectionsFile:
    """A checked MegaDetector batch-output file: the JSON object as read and typed views of it."""

    source: str
    doc: dict
    frames: list[Frame]
    detection_categories: dict[str, str]
    classification_categories: dict[str, str]
    format_version: str


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_categories(doc: dict, key: str, fail) -> dict[str, str]:
    categories = doc.get(key, {})
    if not isinstance(categories, dict):
        fail(f"{key} must be an object of id -> name")
    for cid, name in categories.items():
        if not cid.isdigit():
            fail(f"{key}: category id {cid!r} must be a non-negative integer written as a string")
        if not isinstance(name, str) or not name.strip():
            fail(f"{key}: category {cid!r} needs a non-blank name, got {name!r}")
    return dict(categories)


def _parse_bbox(value, fail) -> tuple[float, float, float, float]:
    if not isinstance(value, list) or len(value) != 4:
        got = f"{len(value)} values" if isinstance(value, list) else type(value).__name__
        fail(f"bbox must be 4 numbers [x_min, y_min, width, height], got {got}")
    if not all(_is_number(v) for v in value):
        fail(f"bbox must be 4 numbers [x_min, y_min, width, height], got {value}")
    x, y, w, h = (float(v) for v in value)
    lo, hi = -_BOX_TOLERANCE, 1 + _BOX_TOLERANCE
    if w < 0 or h < 0 or not (lo <= x <= hi and lo <= y <= hi and x + w <= hi and y + h <= hi):
        fail(f"bbox {value} is not normalised [x_min, y_min, width, height] within the image (0..1)")
    return x, y, w, h


def _parse_classifications(value, classes: dict[str, str], fail) -> tuple[tuple[str, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        fail("classifications must be a list of [category id, confidence]")
    out = []
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and _is_number(pair[1])):
            fail(f"classification {pair!r} must be [category id string, confidence]")
        if pair[0] not in classes:
            fail(f"classification category {pair[0]!r} is not in classification_categories")
        out.append((pair[0], float(pair[1])))
    return tuple(out)


def _parse_rollup(value) -> Rollup | None:
    if not isinstance(value, dict):
        return None
    conf = value.get("conf", 0.0)
    return Rollup(str(value.get("rank", "")), str(value.get("name", "")), float(conf) if _is_number(conf) else 0.0)


def _parse_detection(j: int, det, categories: dict, classes: dict, fail_image) -> Detection:
    def fail(problem: str):
        fail_image(f"detections[{j}]: {problem}")

    if not isinstance(det, dict):
        fail("must be an object with category, conf and bbox")
    for key in ("category", "conf", "bbox"):
        if key not in det:
            fail(f"missing '{key}'")
    category = det["category"]
    if not isinstance(category, str) or category not in categories:
        known = ", ".join(f"{k} ({v})" for k, v in categories.items())
        fail(f"unknown category {category!r}; detection_categories has {known or 'none'}")
    if not _is_number(det["conf"]) or not 0 <= det["conf"] <= 1:
        fail(f"conf must be a number from 0 to 1, got {det['conf']!r}")
    bbox = _parse_bbox(det["bbox"], fail)
    found = _parse_classifications(det.get("classifications"), classes, fail)
    return Detection(j, category, float(det["conf"]), bbox, found, _parse_rollup(det.get("rollup")))


def _parse_capture(entry: dict) -> CaptureTime | None:
    text = entry.get("datetime")
    if not isinstance(text, str) or not text:
        return None
    try:
        return CaptureTime(dt.datetime.fromisoformat(text), str(entry.get("datetime_source", "")))
    except ValueError:
        return None


def _parse_image(i: int, entry, categories: dict, classes: dict, fail_file) -> Frame:
    if not isinstance(entry, dict):
        fail_file(f"images[{i}] must be an object with 'file' and 'detections'")
    file = entry.get("file")
    if not isinstance(file, str) or not file:
        fail_file(f"images[{i}] has no 'file' (the image path, relative to the image folder)")

    def fail(problem: str):
        fail_file(f"images[{i}] ({file!r}): {problem}")

    failure = entry.get("failure")
    if failure is not None and not isinstance(failure, str):
        fail(f"failure must be a string or null, got {failure!r}")
    dets = entry.get("detections")
    if failure is not None and dets:
        fail("has a failure but also detections (a failed image has detections null)")
    if failure is None and not isinstance(dets, list):
        fail("no detections list (an image that did not fail needs one, empty when nothing was found)")
    parsed = (
        None
        if failure is not None
        else tuple(_parse_detection(j, d, categories, classes, fail) for j, d in enumerate(dets))
    )
    is_video = (
        "frame_rate" in entry
        or Path(file).suffix.lower() in _VIDEO_EXTENSIONS
        or any(isinstance(d, dict) and "frame_number" in d for d in dets or [])
    )
    return Frame(i, file, parsed, failure, is_video, _parse_capture(entry))


def parse_detections(doc, source: str = "<detections>") -> DetectionsFile:
    """Check a loaded MegaDetector JSON object; DetectionsFileError names the first bad entry."""

    def fail(problem: str):
        raise DetectionsFileError(f"{source}: {problem}")

    if not isinstance(doc, dict):
        fail(
            f"the top level must be a JSON object with info, detection_categories and images, not {type(doc).__name__}"
        )
    for key in ("info", "detection_categories", "images"):
        if key not in doc:
            fail(f"missing '{key}' (a MegaDetector batch-output file has info, detection_categories and images)")
    info = doc["info"]
    if not isinstance(info, dict) or "format_version" not in info:
        fail("info.format_version is missing")
    version = str(info["format_version"])
    try:
        major = int(float(version))
    except ValueError:
        major = -1
    if major != 1:
        fail(f"format_version {version!r} is not 1.x, the MegaDetector batch-output format hierax reads")
    categories = _check_categories(doc, "detection_categories", fail)
    classes = _check_categories(doc, "classification_categories", fail)
    if not isinstance(doc["images"], list):
        fail("images must be a list")
    frames = [_parse_image(i, entry, categories, classes, fail) for i, entry in enumerate(doc["images"])]
    return DetectionsFile(source, doc, frames, categories, classes, version)


def read_detections(path: str | os.PathLike) -> DetectionsFile:
    """Read and check a MegaDetector batch-output JSON file (see parse_detections)."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        raise DetectionsFileError(f"no such detections file: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DetectionsFileError(f"cannot read the detections file {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise DetectionsFileError(
            f"{path} is not JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
            "expected a MegaDetector batch-output file"
        ) from None
    return parse_detections(doc, str(path))


def default_threshold(md: DetectionsFile) -> float:
    """The detector's own recommendation (info.detector_metadata.typical_detection_threshold), else 0.2."""
    meta = md.doc["info"].get("detector_metadata")
    value = meta.get("typical_detection_threshold") if isinstance(meta, dict) else None
    return float(value) if _is_number(value) and 0 <= value <= 1 else DEFAULT_DETECTION_THRESHOLD


def category_ids(md: DetectionsFile, categories: Iterable[str]) -> set[str]:
    """Detection category ids named by names ("animal") or ids ("1"); unknown ones raise."""
    ids = set()
    for wanted in categories:
        if wanted in md.detection_categories:
            ids.add(wanted)
            continue
        found = {cid for cid, name in md.detection_categories.items() if name.lower() == wanted.strip().lower()}
        if not found:
            known = ", ".join(f"{name} ({cid})" for cid, name in md.detection_categories.items())
            raise DetectionsFileError(f"{md.source}: no detection category '{wanted}'; this file has {known}")
        ids |= found
    return ids


def local_path(root: str | os.PathLike, file: str) -> str:
    """An images[].file joined to `root` (absolute files stay; Windows separators work on POSIX too)."""
    if os.sep == "/":
        file = file.replace("\\", "/")
    return os.path.join(os.fspath(root), file)


def select_detections(
    md: DetectionsFile,
    root: str | os.PathLike,
    *,
    threshold: float | None = None,
    categories: Iterable[str] = ("animal",),
    keep_empty: bool = False,
) -> list[FrameBoxes]:
    """The frames with boxes to classify and those boxes (see the module docstring)."""
    threshold = default_threshold(md) if threshold is None else threshold
    if not 0 <= threshold <= 1:
        raise HieraxError(f"the detection threshold must be between 0 and 1, got {threshold}")
    wanted = category_ids(md, categories)
    selected, videos = [], 0
    for frame in md.frames:
        if frame.detections is None:
            continue
        if frame.is_video:
            videos += 1
            continue
        boxes = tuple((d.index, d.bbox) for d in frame.detections if d.category in wanted and d.conf >= threshold)
        if boxes or keep_empty:
            selected.append(FrameBoxes(frame.index, local_path(root, frame.file), boxes))
    if videos:
        logger.info("%s: %d videos passed through unclassified (hierax classifies still images)", md.source, videos)
    logger.info(
        "%s: %d boxes in %d of %d images to classify (threshold %.2f)",
        md.source,
        sum(len(f.boxes) for f in selected),
        sum(1 for f in selected if f.boxes),
        len(md.frames),
        threshold,
    )
    return selected
