"""Camera Trap Data Packages (Camtrap DP 1.0, the TDWG standard GBIF publishes): datapackage.json, deployments.csv,
media.csv and observations.csv from the MegaDetector-format JSON that `hierax predict ROOT --detections MD.json
--output OUT.json` writes (it holds every image, box, classification, capture time and run setting).

API:
    write_package(predictions, output, *, root=None, deployment_id=None, latitude=None, longitude=None,
                  coordinate_uncertainty=None, deployments=None, utc_offset=None, event_gap_s=None, title=None,
                  contributors=None) -> Path of datapackage.json

What goes where:
- deployments: one per camera folder (deploymentID = the folder, "root" at the top level), or one for everything
  with `deployment_id`. Camtrap DP requires coordinates: from `deployments` (a CSV with deploymentID, latitude,
  longitude and any other Camtrap DP deployment columns) or `latitude` / `longitude` for all. Start and end
  default to the first and last capture time; timestampIssues is true where file times stood in for EXIF ones.
- media: every image with a capture time (images[].datetime, else the file's modification time under `root`,
  default the JSON's folder); naive times get `utc_offset` (default: this machine's time zone;
  hierax.interchange.events.parse_utc_offset reads one). Failed images
  carry their failure as mediaComments.
- observations, media level: one per classified detection (observationType animal, scientificName the answer:
  the roll-up's name when one was made, the top species otherwise; classificationMethod machine,
  classificationProbability, the box); person and vehicle boxes at or above the detection threshold become human
  / vehicle observations with the detector's confidence; an image with no box at or above it is blank.
- observations, event level: one per event with animals (hierax.interchange.events: confidence-weighted species,
  the most individuals in one frame as count).
- taxonomic: every scientificName with its rank, higher ranks and English common name.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import mimetypes
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hierax.atomic import atomic_write
from hierax.data.taxonomy import DEFAULT_THRESHOLDS, RANKS, Taxonomy
from hierax.errors import HieraxError
from hierax.interchange.classified import read_classified
from hierax.interchange.events import (
    DEFAULT_EVENT_GAP_S,
    EventSummary,
    camera_of,
    capture_times,
    group_events,
    summarise_events,
)
from hierax.interchange.megadetector import (
    DetectionsFile,
    default_threshold,
    local_path,
    read_detections,
)
from hierax.interchange.results import Answer, answer

logger = logging.getLogger(__name__)

VERSION = "1.0.2"
BASE_URL = f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{VERSION}"
PROFILE_URL = f"{BASE_URL}/camtrap-dp-profile.json"
# The tables' columns in the standard's order (Camtrap DP 1.0.2 table schemas).
DEPLOYMENT_FIELDS = (
    "deploymentID locationID locationName latitude longitude coordinateUncertainty deploymentStart deploymentEnd "
    "setupBy cameraID cameraModel cameraDelay cameraHeight cameraDepth cameraTilt cameraHeading detectionDistance "
    "timestampIssues baitUse featureType habitat deploymentGroups deploymentTags deploymentComments"
)
MEDIA_FIELDS = (
    "mediaID deploymentID captureMethod timestamp filePath filePublic fileName fileMediatype exifData favorite "
    "mediaComments"
)
OBSERVATION_FIELDS = (
    "observationID deploymentID mediaID eventID eventStart eventEnd observationLevel observationType cameraSetupType "
    "scientificName count lifeStage sex behavior individualID individualPositionRadius individualPositionAngle "
    "individualSpeed bboxX bboxY bboxWidth bboxHeight classificationMethod classifiedBy classificationTimestamp "
    "classificationProbability observationTags observationComments"
)
FIELDS = {
    name: tuple(text.split(" "))
    for name, text in (
        ("deployments", DEPLOYMENT_FIELDS),
        ("media", MEDIA_FIELDS),
        ("observations", OBSERVATION_FIELDS),
    )
}
_DETECTOR_TYPES = {"animal": "animal", "person": "human", "human": "human", "vehicle": "vehicle"}


def _aware(time: dt.datetime, zone: dt.tzinfo | None) -> dt.datetime:
    if time.tzinfo is not None:
        return time
    return time.replace(tzinfo=zone) if zone is not None else time.astimezone()


def _stamp(time: dt.datetime) -> str:
    return time.isoformat(timespec="seconds")


def _file_path(file: str, root: Path) -> str:
    """images[].file as Camtrap DP's filePath: relative, forward slashes, no '..' (absolute ones made relative)."""
    path = file.replace("\\", "/")
    if os.path.isabs(path):
        try:
            path = Path(path).relative_to(root).as_posix()
        except ValueError:
            raise HieraxError(f"{file} is not under {root}: Camtrap DP needs paths relative to the package") from None
    if path.startswith(("./", "~")) or ".." in path.split("/"):
        raise HieraxError(f"{file}: Camtrap DP file paths may not start with ./ or ~ nor contain '..'")
    return path


def _read_deployments_csv(path: str | os.PathLike) -> dict[str, dict]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as err:
        raise HieraxError(f"cannot read the deployments file {path}: {err.strerror or err}") from None
    if not rows or not {"deploymentID", "latitude", "longitude"} <= set(rows[0]):
        raise HieraxError(f"{path}: a deployments CSV needs the columns deploymentID, latitude and longitude")
    unknown = set(rows[0]) - set(FIELDS["deployments"])
    if unknown:
        logger.warning("%s: columns that are not Camtrap DP deployment fields are ignored: %s", path, sorted(unknown))
    return {r["deploymentID"]: {k: v for k, v in r.items() if k in FIELDS["deployments"] and v} for r in rows}


def _deployment_rows(media: list[dict], ids: Sequence[str], given: Mapping[str, dict], location: dict) -> list[dict]:
    rows = []
    for dep in ids:
        mine = [m for m in media if m["deploymentID"] == dep]
        row = {"deploymentID": dep, **location, **given.get(dep, {})}
        if "latitude" not in row or "longitude" not in row:
            raise HieraxError(
                f"Camtrap DP requires every deployment's latitude and longitude; deployment '{dep}' has none: "
                "pass --latitude and --longitude, or --deployments FILE.csv with deploymentID, latitude, longitude"
            )
        row.setdefault("deploymentStart", min(m["timestamp"] for m in mine))
        row.setdefault("deploymentEnd", max(m["timestamp"] for m in mine))
        if any(m["_time_source"] == "file" for m in mine):
            row.setdefault("timestampIssues", "true")
            row.setdefault("deploymentComments", "some capture times are file modification times")
        rows.append(row)
    return rows


def _box(bbox) -> dict:
    x, y, w, h = (min(max(v, 0.0), 1.0) for v in bbox)
    w, h = max(min(w, 1.0 - x), 1e-15), max(min(h, 1.0 - y), 1e-15)
    return {"bboxX": round(x, 6), "bboxY": round(y, 6), "bboxWidth": round(w, 6), "bboxHeight": round(h, 6)}


def _taxon_entry(a: Answer) -> dict:
    entry = {"scientificName": a.name}
    if a.rank in RANKS:
        entry["taxonRank"] = a.rank
        for rank, name in zip(RANKS[:-1], a.lineage):
            if rank != a.rank:
                entry[rank] = name
    if a.common_name:
        entry["vernacularNames"] = {"eng": a.common_name}
    return entry


def _write_csv(path: Path, name: str, rows: list[dict]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            out = csv.DictWriter(fh, fieldnames=FIELDS[name], extrasaction="ignore")
            out.writeheader()
            out.writerows(rows)

    atomic_write(path / f"{name}.csv", write)


def _spatial(deployments: list[dict]) -> dict:
    points = sorted({(float(d["longitude"]), float(d["latitude"])) for d in deployments})
    if len(points) == 1:
        return {"type": "Point", "coordinates": list(points[0])}
    (x0, x1), (y0, y1) = ((min(v), max(v)) for v in zip(*points))
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


@dataclass
class _Run:
    """What the tables are made from: the file, its classifications and the settings predict recorded."""

    md: DetectionsFile
    taxonomy: Taxonomy
    results: dict
    root: Path
    zone: dt.tzinfo | None
    threshold: float
    classifier: str
    detector: str
    classified_at: str

    def stamp(self, time: dt.datetime) -> str:
        return _stamp(_aware(time, self.zone))


def _media_and_observations(run: _Run, listed, times, cameras, event_of) -> tuple[list[dict], list[dict]]:
    """One media row per listed image and its media-level observations (animal, human, vehicle or blank)."""
    media, observations = [], []
    for i in listed:
        frame, stamp = run.md.frames[i], run.stamp(times[i].time)
        mid, path = f"m{i + 1:06d}", _file_path(frame.file, run.root)
        media.append(
            {
                "mediaID": mid,
                "deploymentID": cameras[i],
                "captureMethod": "activityDetection",
                "timestamp": stamp,
                "filePath": path,
                "filePublic": "false",
                "fileName": path.rsplit("/", 1)[-1],
                "fileMediatype": mimetypes.guess_type(path)[0] or "image/jpeg",
                "mediaComments": frame.failure or "",
                "_time_source": times[i].source,
            }
        )
        if frame.failure is not None or frame.is_video:
            continue
        base = {"deploymentID": cameras[i], "mediaID": mid, "eventID": event_of[i].id, "eventStart": stamp}
        base.update(eventEnd=stamp, observationLevel="media", classificationMethod="machine")
        kept = [d for d in frame.detections if d.conf >= run.threshold or (i, d.index) in run.results]
        for d in kept:
            row = {**base, "observationID": f"{mid}-{d.index}", **_box(d.bbox), "count": 1}
            found = run.results.get((i, d.index))
            if found is not None:
                a = answer(found, run.taxonomy)
                row.update(observationType="animal", scientificName=a.name, classifiedBy=run.classifier)
                row.update(classificationTimestamp=run.classified_at, classificationProbability=round(a.probability, 4))
            else:
                kind = _DETECTOR_TYPES.get(run.md.detection_categories[d.category].lower(), "unknown")
                row.update(observationType=kind, classifiedBy=run.detector, classificationProbability=round(d.conf, 4))
            observations.append(row)
        if not kept:
            blank = {"observationID": f"{mid}-blank", "observationType": "blank", "classifiedBy": run.detector}
            observations.append({**base, **blank})
    return media, observations


def _event_observations(run: _Run, summaries: Sequence[EventSummary]) -> list[dict]:
    """One event-level observation per event with classified animals."""
    rows = []
    for s in summaries:
        if s.answer is None:
            continue
        rows.append(
            {
                "observationID": f"{s.event.id}-animal",
                "deploymentID": s.event.camera,
                "eventID": s.event.id,
                "eventStart": run.stamp(s.event.start),
                "eventEnd": run.stamp(s.event.end),
                "observationLevel": "event",
                "observationType": "animal",
                "scientificName": s.answer.name,
                "count": s.count,
                "classificationMethod": "machine",
                "classifiedBy": run.classifier,
                "classificationTimestamp": run.classified_at,
                "classificationProbability": round(s.answer.probability, 4),
            }
        )
    return rows


def _descriptor(run: _Run, deployments, media, answers: Sequence[Answer], title, contributors) -> dict:
    """datapackage.json: the resources, the project, where, when and which taxa."""
    stamps = [m["timestamp"] for m in media]
    taxa = {a.name: a for a in reversed(answers) if a.identified}
    title = title or "Camera trap observations classified by hierax"
    resource = {"profile": "tabular-data-resource", "format": "csv", "mediatype": "text/csv", "encoding": "utf-8"}
    return {
        "resources": [
            {"name": n, "path": f"{n}.csv", **resource, "schema": f"{BASE_URL}/{n}-table-schema.json"} for n in FIELDS
        ],
        "profile": PROFILE_URL,
        "id": str(uuid.uuid4()),
        "created": _stamp(dt.datetime.now(dt.UTC)),
        "title": title,
        "contributors": [{"title": name, "role": "contributor"} for name in (contributors or ["hierax"])],
        "sources": [{"title": run.classifier}, {"title": run.detector}],
        "project": {
            "title": title,
            "samplingDesign": "opportunistic",
            "captureMethod": ["activityDetection"],
            "individualAnimals": False,
            "observationLevel": ["media", "event"],
        },
        "spatial": _spatial(deployments),
        "temporal": {"start": min(stamps)[:10], "end": max(stamps)[:10]},
        "taxonomic": [_taxon_entry(taxa[name]) for name in sorted(taxa)],
    }


def _open(predictions, root, utc_offset) -> tuple[_Run, dict]:
    md = read_detections(predictions)
    if not md.classification_categories and "classifier" not in md.doc["info"]:
        raise HieraxError(f"{predictions} has no classifications: give the JSON that hierax predict --detections wrote")
    taxonomy, results = read_classified(md)
    info = md.doc["info"]
    meta = info.get("classifier_metadata") or {}
    completed = info.get("classification_completion_time")
    run = _Run(
        md,
        taxonomy,
        results,
        Path(root) if root is not None else Path(predictions).resolve().parent,
        utc_offset,
        float(meta.get("detection_threshold", default_threshold(md))),
        str(info.get("classifier", "hierax")),
        str(info.get("detector", "MegaDetector")),
        _stamp(_aware(dt.datetime.fromisoformat(completed), utc_offset)) if completed else "",
    )
    return run, meta


def write_package(
    predictions: str | os.PathLike,
    output: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    deployment_id: str | None = None,
    latitude: float | None = None,
    longitude: float | None = None,
    coordinate_uncertainty: int | None = None,
    deployments: str | os.PathLike | None = None,
    utc_offset: dt.tzinfo | None = None,
    event_gap_s: float | None = None,
    title: str | None = None,
    contributors: Sequence[str] | None = None,
) -> Path:
    """Write a Camtrap DP package from hierax's MegaDetector-format predictions (see the module docstring)."""
    run, meta = _open(predictions, root, utc_offset)
    md = run.md

    # Capture times as predict recorded them, else the file's; an image without one cannot be listed.
    fallback = capture_times([local_path(run.root, f.file) for f in md.frames])
    times = [f.capture or fallback[i] for i, f in enumerate(md.frames)]
    cameras = [deployment_id or camera_of(f.file) or "root" for f in md.frames]
    listed = [i for i, t in enumerate(times) if t.time is not None]
    if not listed:
        raise HieraxError(f"no image of {predictions} has a capture time: give --root, the folder the images are in")
    if len(listed) < len(md.frames):
        logger.warning(
            "%d images have no capture time (none recorded, not under %s): left out",
            len(md.frames) - len(listed),
            run.root,
        )

    # Events over the listed images, then the per-event answers.
    gap = float(event_gap_s if event_gap_s is not None else meta.get("event_gap_s", DEFAULT_EVENT_GAP_S))
    events = group_events([cameras[i] for i in listed], [times[i] for i in listed], gap_s=gap)
    event_of = {listed[j]: e for e in events for j in e.frames}
    position = {i: n for n, i in enumerate(listed)}
    detections: dict[int, list] = {}
    for (i, j), c in sorted(run.results.items()):
        if i in position:
            detections.setdefault(position[i], []).append((md.frames[i].detections[j].conf, c))
    rollup = any(c.rollup is not None for c in run.results.values())
    k = max((len(c.indices) for c in run.results.values()), default=1)
    thresholds = meta.get("rollup_thresholds", DEFAULT_THRESHOLDS)
    summaries = summarise_events(events, detections, run.taxonomy, k=k, rollup=rollup, thresholds=thresholds)

    # The tables and the descriptor.
    media, observations = _media_and_observations(run, listed, times, cameras, event_of)
    observations += _event_observations(run, summaries)
    location = {"latitude": latitude, "longitude": longitude} if latitude is not None and longitude is not None else {}
    if location and coordinate_uncertainty is not None:
        location["coordinateUncertainty"] = int(coordinate_uncertainty)
    given = _read_deployments_csv(deployments) if deployments is not None else {}
    deployment_rows = _deployment_rows(media, sorted({cameras[i] for i in listed}), given, location)
    answers = [answer(c, run.taxonomy) for _, c in sorted(run.results.items())]
    answers += [s.answer for s in summaries if s.answer is not None]
    descriptor = _descriptor(run, deployment_rows, media, answers, title, contributors)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("deployments", deployment_rows), ("media", media), ("observations", observations)):
        _write_csv(out, name, rows)
    return atomic_write(
        out / "datapackage.json", lambda tmp: Path(tmp).write_text(json.dumps(descriptor, indent=2), "utf-8")
    )
