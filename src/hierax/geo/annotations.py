"""Presence records from an iNat21-format annotation file (COCO-like JSON).

`images[]` give `latitude`, `longitude` and `date`; `annotations[]` tie an `image_id` to a `category_id`;
`categories[]` name the species (`image_dir_name` such as `00000_Animalia_..._Lumbricus_terrestris`, `name`,
and the taxonomy fields `genus` and `specific_epithet`). Each category is aligned to the image model's classes by
its directory name, else its binomial. Nothing in the data is fatal: records whose category matches no class,
whose image has no usable location (or no date, when the date is an input), or whose image is missing, are
skipped and counted in the `FitSummary`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from hierax.data.taxonomy import Taxonomy
from hierax.errors import HieraxError
from hierax.geo.classes import match_keys
from hierax.geo.encoding import day_fraction

logger = logging.getLogger(__name__)


@dataclass
class Records:
    """Presence records aligned to a model's classes: degrees, day fractions (NaN: undated), class indices."""

    lat: np.ndarray
    lon: np.ndarray
    day: np.ndarray
    label: np.ndarray
    class_names: list[str]
    common_names: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.label)


@dataclass
class FitSummary:
    """What was read and what was skipped, and why."""

    images: int = 0
    annotations: int = 0
    used: int = 0
    no_location: int = 0  # latitude or longitude missing or null
    bad_location: int = 0  # not a number, or off the globe
    no_date: int = 0  # undated images (skipped only when the prior uses the date)
    missing_image: int = 0  # annotations whose image_id is not among the images
    unmatched: int = 0  # records of categories that match no class of the model
    unmatched_categories: int = 0
    unmatched_examples: list[str] = field(default_factory=list)
    classes: int = 0
    classes_with_records: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """A human summary, one fact per line."""
        out = [
            f"{self.used:,} of {self.annotations:,} records used, {self.classes_with_records:,} of "
            f"{self.classes:,} model classes have records"
        ]
        skipped = {
            "without a location": self.no_location,
            "with a broken location": self.bad_location,
            "without a date (use --no-date to keep them)": self.no_date,
            "whose image is missing": self.missing_image,
            f"of {self.unmatched_categories:,} categories that match no model class": self.unmatched,
        }
        out += [f"skipped {n:,} records {why}" for why, n in skipped.items() if n]
        if self.unmatched_examples:
            out.append("unmatched categories, e.g.: " + ", ".join(self.unmatched_examples))
        return out


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise HieraxError(f"no such annotation file: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as err:
        raise HieraxError(f"{path} is not valid JSON ({err}); expected an iNat21-format annotation file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise HieraxError(f"cannot read {path}: {err}") from None
    keys = ("images", "annotations", "categories")
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in keys):
        raise HieraxError(
            f"{path} is not an iNat21-format annotation file: it needs the lists 'images' (with latitude, "
            "longitude, date), 'annotations' (image_id, category_id) and 'categories' (id, image_dir_name or name)"
        )
    return doc


def _coordinate(value: Any, limit: float) -> float | None:
    """A coordinate in [-limit, limit]; None for missing; NaN for broken values."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) and abs(number) <= limit else math.nan


@lru_cache(maxsize=65536)
def _cached_day(text: str) -> float:
    return day_fraction(text)


def _category_targets(categories: list, taxonomy: Taxonomy) -> tuple[dict[Any, int], dict[int, str], dict]:
    """category id -> class index (-1: unmatched), class index -> common name, category id -> name."""
    targets: dict[Any, int] = {}
    common: dict[int, str] = {}
    names: dict[Any, str] = {}
    for cat in categories:
        if not isinstance(cat, dict) or "id" not in cat:
            continue
        binomial = f"{cat.get('genus') or ''} {cat.get('specific_epithet') or ''}".strip()
        index = match_keys([cat.get("image_dir_name"), cat.get("name"), binomial or None], taxonomy)
        targets[cat["id"]] = index
        names[cat["id"]] = str(cat.get("image_dir_name") or cat.get("name") or cat["id"])
        if index >= 0 and cat.get("common_name"):
            common.setdefault(index, str(cat["common_name"]))
    return targets, common, names


def read_annotations(path: str | Path, class_names: list[str], *, use_date: bool = True) -> tuple[Records, FitSummary]:
    """Presence records of an iNat21-format annotation file, aligned to `class_names` (index order).
    HieraxError when the file is not in that format or when no record matches a class."""
    path = Path(path)
    doc = _load_json(path)
    summary = FitSummary(images=len(doc["images"]), annotations=len(doc["annotations"]), classes=len(class_names))
    targets, common, cat_names = _category_targets(doc["categories"], Taxonomy(class_names))
    places: dict[Any, tuple[float | None, float | None, float]] = {}
    for image in doc["images"]:
        if isinstance(image, dict) and "id" in image:
            date = image.get("date")
            day = _cached_day(date) if isinstance(date, str) else math.nan
            places[image["id"]] = (
                _coordinate(image.get("latitude"), 90),
                _coordinate(image.get("longitude"), 180),
                day,
            )
    lat, lon, day, label = [], [], [], []
    unmatched: dict[Any, int] = {}
    for ann in doc["annotations"]:
        if not isinstance(ann, dict):
            continue
        target = targets.get(ann.get("category_id"), -1)
        place = places.get(ann.get("image_id"))
        if target < 0:
            summary.unmatched += 1
            unmatched[ann.get("category_id")] = unmatched.get(ann.get("category_id"), 0) + 1
        elif place is None:
            summary.missing_image += 1
        elif place[0] is None or place[1] is None:
            summary.no_location += 1
        elif math.isnan(place[0]) or math.isnan(place[1]) or (place[0] == 0.0 and place[1] == 0.0):
            summary.bad_location += 1
        elif use_date and math.isnan(place[2]):
            summary.no_date += 1
        else:
            lat.append(place[0])
            lon.append(place[1])
            day.append(place[2])
            label.append(target)
    summary.used = len(label)
    summary.unmatched_categories = len(unmatched)
    summary.unmatched_examples = [cat_names.get(c, str(c)) for c in sorted(unmatched, key=unmatched.get)[::-1][:5]]
    labels = np.asarray(label, dtype=np.int64)
    summary.classes_with_records = int(len(np.unique(labels)))
    if summary.used == 0:
        matched = sum(1 for t in targets.values() if t >= 0)
        hint = (
            "no category matches a class of the model (by iNat21 directory name or binomial)"
            if matched == 0
            else "no record has a usable location" + (" and date (try --no-date)" if use_date else "")
        )
        raise HieraxError(f"{path}: nothing to fit: {hint}")
    logger.debug("annotations %s: %s", path, "; ".join(summary.lines()))
    records = Records(
        np.asarray(lat, dtype=np.float32),
        np.asarray(lon, dtype=np.float32),
        np.asarray(day, dtype=np.float32),
        labels,
        list(class_names),
        common,
    )
    return records, summary


def annotation_rows(path: str | Path, root: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Per image of an iNat21-format file: {"latitude", "longitude", "date"} as written there, keyed by
    os.path.join(root, file_name) exactly as hierax.data.datasets builds its paths (root: the file's folder
    unless given). Feed a value to `hierax.data.metadata.capture_context(path, row)` (it checks the values)."""
    path = Path(path)
    doc = _load_json(path)
    base = os.fspath(root) if root is not None else os.path.dirname(os.fspath(path))
    rows = {}
    for image in doc["images"]:
        if isinstance(image, dict) and image.get("file_name"):
            rows[os.path.join(base, image["file_name"])] = {k: image.get(k) for k in ("latitude", "longitude", "date")}
    return rows
