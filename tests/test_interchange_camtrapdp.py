"""Camtrap DP packages from hierax's MegaDetector-format output, validated by frictionless (table schemas, types,
keys between the tables) and by the Camtrap DP profile (JSON Schema), both from local copies of Camtrap DP 1.0.2.

tests/data/camtrap-dp-1.0.2/ holds the profile and the three table schemas of TDWG's camtrap-dp repository at
tag 1.0.2, unchanged, under its MIT licence (LICENSE beside them, Copyright (c) 2021 Camtrap DP Development Team).
The tests are offline, so the profile's two remote references (the generic Data Package schema, which
frictionless checks itself, and GeoJSON) are left out when it is applied.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import jsonschema
import pytest

from hierax.cli import main
from hierax.data.taxonomy import Taxonomy
from hierax.interchange.camtrapdp import PROFILE_URL, write_package
from hierax.interchange.classified import write_classified
from hierax.interchange.events import capture_times, parse_utc_offset
from hierax.interchange.megadetector import local_path, read_detections

from .interchange_support import CLASS_NAMES, SCHEMAS, classify_detections, frictionless_report, make_camera_folder


def _profile_errors(descriptor: dict) -> list[str]:
    profile = json.loads((SCHEMAS / "camtrap-dp-profile.json").read_text())
    profile["allOf"] = [part for part in profile["allOf"] if "$ref" not in part]
    profile["allOf"][0]["properties"]["spatial"].pop("$ref")
    validator = jsonschema.validators.validator_for(profile)(profile, format_checker=jsonschema.FormatChecker())
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(descriptor)]


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def predictions(tmp_path_factory):
    root = tmp_path_factory.mktemp("traps")
    md, results, failures, taxonomy = classify_detections(make_camera_folder(root), root)
    meta = {"detection_threshold": 0.2, "event_gap_s": 60, "top_k": 3}
    out = write_classified(
        root / "hierax.json",
        md,
        results,
        taxonomy,
        failures=failures,
        classifier="hierax:tiny",
        classifier_metadata=meta,
    )
    return root, out, results


def test_package_is_valid_camtrap_dp(predictions, tmp_path):
    root, out, results = predictions
    package = write_package(out, tmp_path / "pkg", latitude=52.1, longitude=5.2, utc_offset=parse_utc_offset("+02:00"))
    report = frictionless_report(package.parent, tmp_path / "check")
    assert report.valid, report.flatten(["rowNumber", "fieldName", "type", "message"])
    descriptor = json.loads(package.read_text())
    assert descriptor["profile"] == PROFILE_URL
    assert _profile_errors(descriptor) == []

    deployments = _rows(package.parent / "deployments.csv")
    assert [d["deploymentID"] for d in deployments] == ["cam1", "cam2"]
    assert (
        deployments[0]["deploymentStart"] == "2024-05-01T06:00:00+02:00" and deployments[0]["timestampIssues"] == "true"
    )
    media = _rows(package.parent / "media.csv")
    assert len(media) == 8  # the detector's failed image is not on disk and has no time
    assert media[0]["filePath"] == "cam1/IMG_0001.JPG" and media[0]["fileMediatype"] == "image/jpeg"
    assert media[7]["mediaComments"] == "image access failure"
    observations = _rows(package.parent / "observations.csv")
    by_level = {lvl: [o for o in observations if o["observationLevel"] == lvl] for lvl in ("media", "event")}
    animals = [o for o in by_level["media"] if o["observationType"] == "animal"]
    assert len(animals) == len(results) == 7
    assert all(o["classificationMethod"] == "machine" and o["classifiedBy"] == "hierax:tiny" for o in animals)
    assert all(0 <= float(o["classificationProbability"]) <= 1 and o["bboxWidth"] for o in animals)
    assert {o["observationType"] for o in by_level["media"]} == {"animal", "human", "vehicle", "blank"}
    blanks = [o["mediaID"] for o in by_level["media"] if o["observationType"] == "blank"]
    assert blanks == ["m000003", "m000005"]  # below-threshold box; no box
    events = by_level["event"]
    assert [(e["eventID"], e["count"]) for e in events] == [
        ("event000001", "2"),
        ("event000002", "3"),
        ("event000004", "1"),
    ]
    assert (
        events[0]["eventStart"] == "2024-05-01T06:00:00+02:00" and events[0]["eventEnd"] == "2024-05-01T06:00:04+02:00"
    )
    assert {o["eventID"] for o in animals} == {e["eventID"] for e in events}
    names = {o["scientificName"] for o in observations if o["scientificName"]}
    taxonomic = {t["scientificName"]: t for t in descriptor["taxonomic"]}
    assert set(taxonomic) == names
    for entry in taxonomic.values():
        assert entry["taxonRank"] in ("species", "genus", "family") and entry["kingdom"] in ("Animalia", "Plantae")


def test_broken_tables_fail_validation(predictions, tmp_path):
    """The check is real: a dangling media reference and a bad timestamp are caught."""
    _, out, _ = predictions
    package = write_package(out, tmp_path / "pkg", latitude=52.1, longitude=5.2)
    obs = package.parent / "observations.csv"
    obs.write_text(obs.read_text().replace("m000001-0,cam1,m000001", "m000001-0,cam1,m999999", 1))
    media = package.parent / "media.csv"
    media.write_text(media.read_text().replace("2024-05-01T06:00:02", "yesterday", 1))
    report = frictionless_report(package.parent, tmp_path / "check")
    kinds = {e[0] for e in report.flatten(["type"])}
    assert not report.valid and {"foreign-key", "type-error"} <= kinds


def test_deployments_file_one_deployment_and_errors(predictions, tmp_path):
    _, out, _ = predictions
    with pytest.raises(Exception, match="requires every deployment's latitude and longitude.*cam1"):
        write_package(out, tmp_path / "none")
    table = tmp_path / "deployments.csv"
    table.write_text(
        "deploymentID,latitude,longitude,cameraModel,habitat\ncam1,51.5,4.7,Reconyx-HF2X,forest\ncam2,51.6,4.8,,\n"
    )
    package = write_package(out, tmp_path / "pkg", deployments=table)
    assert frictionless_report(package.parent, tmp_path / "check").valid
    rows = _rows(package.parent / "deployments.csv")
    assert (rows[0]["cameraModel"], rows[0]["habitat"], rows[1]["latitude"]) == ("Reconyx-HF2X", "forest", "51.6")
    assert json.loads(package.read_text())["spatial"]["type"] == "Polygon"
    single = write_package(out, tmp_path / "one", deployment_id="site-A", latitude=1.0, longitude=2.0)
    assert {m["deploymentID"] for m in _rows(single.parent / "media.csv")} == {"site-A"}
    assert json.loads(single.read_text())["spatial"] == {"type": "Point", "coordinates": [2.0, 1.0]}
    with pytest.raises(Exception, match="bad UTC offset"):
        parse_utc_offset("two hours")


def test_cli(predictions, tmp_path, capsys):
    _, out, _ = predictions
    args = ["camtrapdp", str(out), "--output", str(tmp_path / "pkg")]
    assert main([*args, "--latitude", "52.1", "--longitude", "5.2", "--utc-offset", "+01:00"]) == 0
    assert "datapackage.json" in capsys.readouterr().out
    media = _rows(tmp_path / "pkg" / "media.csv")
    assert media[0]["timestamp"] == "2024-05-01T06:00:00+01:00"
    assert main(args) == 1
    assert "latitude" in capsys.readouterr().err
    assert main([*args, "--latitude", "52.1"]) == 1
    assert "both --latitude and --longitude" in capsys.readouterr().err


def test_recorded_capture_times_are_used(tmp_path):
    root = tmp_path / "traps"
    md, results, failures, taxonomy = classify_detections(make_camera_folder(root), root)
    exif = [dt.datetime(2023, 7, 1, 12, 0, i) for i in range(len(md.frames))]
    times = capture_times([local_path(root, f.file) for f in md.frames], exif)
    out = write_classified(root / "hierax.json", md, results, taxonomy, failures=failures, times=times)
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    package = write_package(out, tmp_path / "pkg", root=elsewhere, latitude=0.5, longitude=0.5, event_gap_s=0)
    media = _rows(package.parent / "media.csv")
    assert len(media) == len(md.frames)  # the detector's failed image has a recorded time now
    assert media[0]["timestamp"].startswith("2023-07-01T12:00:00")
    assert {d["timestampIssues"] for d in _rows(package.parent / "deployments.csv")} == {""}
    events = [o for o in _rows(package.parent / "observations.csv") if o["observationLevel"] == "event"]
    assert len(events) == 4  # a zero gap: each of the 4 frames with classified animals is an event of its own
    assert frictionless_report(package.parent, tmp_path / "check").valid


def test_a_run_without_animals_still_makes_a_package(tmp_path):
    detector_output = make_camera_folder(tmp_path)
    md = read_detections(detector_output)
    out = write_classified(tmp_path / "none.json", md, {}, Taxonomy(CLASS_NAMES), classifier="hierax:tiny")
    package = write_package(out, tmp_path / "pkg", latitude=52.1, longitude=5.2)
    assert frictionless_report(package.parent, tmp_path / "check").valid
    kinds = {o["observationType"] for o in _rows(package.parent / "observations.csv")}
    assert kinds == {"animal", "human", "vehicle", "blank"}  # unclassified animal boxes stay animals, unnamed
    assert json.loads(package.read_text())["taxonomic"] == []
    with pytest.raises(Exception, match="has no classifications"):
        write_package(detector_output, tmp_path / "pkg2", latitude=1.0, longitude=1.0)
