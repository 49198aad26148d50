"""hierax's classifications in MegaDetector batch-output files: written into a file that
hierax.interchange.megadetector read, and read back.

API:
    classified_document(md, results, taxonomy, *, failures=None, times=None, classifier, classifier_metadata=None)
        -> dict; write_classified(path, ...) writes it atomically. `results` maps (frame, detection) to a
        Classification. Every input image is kept with all its fields; each classified detection gets
        `classifications` = [[id, conf], ...] (top-k, best first) and, with a roll-up, `rollup` = {rank, name,
        conf}; ids are the model's class indices, named in `classification_categories` (common name, else
        scientific name) and described in `classification_category_descriptions`
        ("Kingdom;Phylum;Class;Order;Family;Genus;Genus species", so a prefix test finds every member of a taxon).
        Frames in `failures` get failure "image access failure" and detections null, as MegaDetector writes
        them. `times` (one CaptureTime per frame) become images[].datetime and images[].datetime_source.
        format_version becomes "1.6" (the current one) unless the file holds videos, whose entries stay as
        they were under the file's own version. `classifier_metadata` goes to info.classifier_metadata;
        `hierax camtrapdp` reads detection_threshold, event_gap_s and rollup_thresholds from it.
    read_classified(md) -> (Taxonomy, {(frame, detection): Classification}): the classifications of a file hierax
        wrote, over a Taxonomy of the categories it names (roll-ups work on it).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from hierax.atomic import atomic_write
from hierax.data.taxonomy import RANKS, Taxonomy
from hierax.interchange.events import CaptureTime
from hierax.interchange.megadetector import FORMAT_VERSION, DetectionsFile
from hierax.interchange.results import Classification

logger = logging.getLogger(__name__)

FAILURE_IMAGE_OPEN = "image access failure"


def category_name(taxonomy: Taxonomy, index: int) -> str:
    """A classification category's display name: the common name, else the scientific name, else the class."""
    common = taxonomy.common_name(index)
    taxon = taxonomy.taxon(index) if taxonomy.is_taxonomic else None
    return common or (taxon.species if taxon is not None else taxonomy.class_names[index])


def category_description(taxonomy: Taxonomy, index: int) -> str:
    """'Kingdom;Phylum;Class;Order;Family;Genus;Genus species' for iNat21 classes, else the class name."""
    taxon = taxonomy.taxon(index) if taxonomy.is_taxonomic else None
    return ";".join(taxon.at(r) for r in RANKS) if taxon is not None else taxonomy.class_names[index]


def _output_version(md: DetectionsFile) -> str:
    if any(f.is_video for f in md.frames):
        return md.format_version
    return FORMAT_VERSION if float(md.format_version) <= float(FORMAT_VERSION) else md.format_version


def _classified_entry(entry: dict, i: int, results: Mapping, failures: Mapping, times) -> None:
    """Update one images[] entry in place: failure, capture time, classifications of its detections."""
    if i in failures:
        entry["failure"] = FAILURE_IMAGE_OPEN
        entry["detections"] = None
    if times is not None and times[i].time is not None:
        entry["datetime"] = times[i].time.isoformat()
        entry["datetime_source"] = times[i].source
    for j, det in enumerate(entry.get("detections") or []):
        det["conf"] = float(det["conf"])
        det.pop("classifications", None)
        det.pop("rollup", None)
        found = results.get((i, j))
        if found is None:
            continue
        det["classifications"] = [[str(k), round(float(p), 4)] for k, p in zip(found.indices, found.probs)]
        if found.rollup is not None:
            r = found.rollup
            det["rollup"] = {"rank": r.rank, "name": r.name, "conf": round(float(r.probability), 4)}


def classified_document(
    md: DetectionsFile,
    results: Mapping[tuple[int, int], Classification],
    taxonomy: Taxonomy,
    *,
    failures: Mapping[int, str] | None = None,
    times: Sequence[CaptureTime] | None = None,
    classifier: str = "hierax",
    classifier_metadata: Mapping | None = None,
) -> dict:
    """The MegaDetector document with hierax's classifications (see the module docstring)."""
    failures = failures or {}
    if times is not None and len(times) != len(md.frames):
        raise ValueError(f"{len(md.frames)} images but {len(times)} capture times")
    if md.classification_categories:
        logger.warning("%s: replacing the classifications already in the file with hierax's", md.source)
    doc = copy.deepcopy(md.doc)
    for i, entry in enumerate(doc["images"]):
        _classified_entry(entry, i, results, failures, times)
    used = sorted({k for c in results.values() for k in c.indices})
    doc["classification_categories"] = {str(k): category_name(taxonomy, k) for k in used}
    doc["classification_category_descriptions"] = {str(k): category_description(taxonomy, k) for k in used}
    info = doc["info"]
    info["format_version"] = _output_version(md)
    info["classifier"] = classifier
    info["classification_completion_time"] = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    info["classifier_metadata"] = dict(classifier_metadata or {})
    return doc


def write_classified(path: str | os.PathLike, md: DetectionsFile, results, taxonomy: Taxonomy, **kwargs) -> Path:
    """Write classified_document(...) to `path` atomically (UTF-8 JSON); returns the path."""
    doc = classified_document(md, results, taxonomy, **kwargs)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, ensure_ascii=False)

    return atomic_write(path, write)


def _class_name(cid: str, description: str, name: str) -> str:
    """An iNat21-style class name rebuilt from a hierax description, so the Taxonomy can roll up; else `name`."""
    parts = description.split(";")
    if len(parts) == len(RANKS) and all(p and "_" not in p for p in parts) and parts[6].startswith(parts[5] + " "):
        return "_".join([f"{int(cid):05d}", *parts[:6], parts[6][len(parts[5]) + 1 :]])
    return name


def read_classified(md: DetectionsFile) -> tuple[Taxonomy, dict[tuple[int, int], Classification]]:
    """The classifications in a file hierax wrote, as Classifications over a Taxonomy of its categories."""
    ids = sorted(md.classification_categories, key=int)
    position = {cid: n for n, cid in enumerate(ids)}
    descriptions = md.doc.get("classification_category_descriptions") or {}
    names = [_class_name(c, str(descriptions.get(c, "")), md.classification_categories[c]) for c in ids]
    taxonomy = Taxonomy(names)
    if not taxonomy.is_taxonomic:
        names = [md.classification_categories[c] for c in ids]
    common = {}
    for n, cid in enumerate(ids):
        shown = md.classification_categories[cid]
        taxon = taxonomy.taxon(n) if taxonomy.is_taxonomic else None
        if taxon is not None and shown != taxon.species:
            common[n] = shown
    taxonomy = Taxonomy(names, common)
    results = {}
    for frame in md.frames:
        for det in frame.detections or ():
            if det.classifications:
                indices = tuple(position[c] for c, _ in det.classifications)
                probs = tuple(p for _, p in det.classifications)
                results[(frame.index, det.index)] = Classification(indices, probs, det.rollup)
    return taxonomy, results
