"""MegaDetector batch files: reading with clear errors, choosing boxes, and writing files MegaDetector's own
validator accepts, round-tripping hierax's classifications."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from hierax.interchange.classified import classified_document, read_classified, write_classified
from hierax.interchange.events import capture_times
from hierax.interchange.megadetector import (
    DetectionsFileError,
    local_path,
    parse_detections,
    read_detections,
    select_detections,
)
from hierax.interchange.results import answer

from .interchange_support import CLASS_NAMES, classify_detections, make_camera_folder, megadetector_validator


@pytest.fixture(scope="module")
def validator():
    return megadetector_validator()


def test_written_file_passes_megadetector_validator_and_round_trips(tmp_path, validator):
    md_path = make_camera_folder(tmp_path)
    md, results, failures, taxonomy = classify_detections(md_path, tmp_path)
    assert len(results) == 7  # animal boxes at or above 0.2 in readable frames
    assert list(failures) == [7]  # cam2/broken.JPG
    exif = [dt.datetime(2024, 5, 1, 5, 59, 58)] + [None] * (len(md.frames) - 1)
    times = capture_times([local_path(tmp_path, f.file) for f in md.frames], exif)
    out = write_classified(
        tmp_path / "out.json",
        md,
        results,
        taxonomy,
        failures=failures,
        times=times,
        classifier="hierax:tiny",
        classifier_metadata={"top_k": 3},
    )
    report = validator(out)
    assert report["errors"] == [] and report["warnings"] == []
    assert sum(report["classification_category_id_to_count"].values()) == 7 * 3

    doc = json.loads(out.read_text())
    original = json.loads(md_path.read_text())
    assert [im["file"] for im in doc["images"]] == [im["file"] for im in original["images"]]
    assert doc["info"]["format_version"] == "1.6"
    assert doc["info"]["detector"] == "md_v5a.0.0.pt" and doc["info"]["classifier"] == "hierax:tiny"
    assert doc["info"]["classifier_metadata"] == {"top_k": 3}
    broken = doc["images"][7]
    assert (broken["file"], broken["detections"], broken["failure"]) == (
        "cam2/broken.JPG",
        None,
        "image access failure",
    )
    assert doc["images"][8]["failure"] == "image access failure"  # the detector's own failure stays
    person = doc["images"][1]["detections"][1]
    assert person["category"] == "2" and "classifications" not in person
    fox = doc["images"][0]["detections"][0]
    assert [c[1] for c in fox["classifications"]] == sorted((c[1] for c in fox["classifications"]), reverse=True)
    for cid, description in doc["classification_category_descriptions"].items():
        assert description.split(";") == CLASS_NAMES[int(cid)].split("_")[1:7] + [
            " ".join(CLASS_NAMES[int(cid)].split("_")[6:])
        ]
    assert doc["classification_categories"].get("0", "red fox") == "red fox"

    assert (doc["images"][0]["datetime"], doc["images"][0]["datetime_source"]) == ("2024-05-01T05:59:58", "exif")
    assert (doc["images"][1]["datetime"], doc["images"][1]["datetime_source"]) == ("2024-05-01T06:00:02", "file")
    assert "datetime" not in doc["images"][8]  # not on disk, no time
    again = read_detections(out)
    assert [f.capture for f in again.frames] == [t if t.time else None for t in times]
    taxonomy_back, results_back = read_classified(again)
    assert set(results_back) == set(results)
    for key, c in results.items():
        back = results_back[key]
        assert [taxonomy_back.class_names[i].split("_", 1)[1] for i in back.indices] == [
            taxonomy.class_names[i].split("_", 1)[1] for i in c.indices
        ]
        assert back.probs == pytest.approx(c.probs, abs=5e-5)
        assert answer(back, taxonomy_back).name == answer(c, taxonomy).name
    # A second classification run over hierax's own output replaces the classifications, and still validates.
    twice = write_classified(tmp_path / "twice.json", again, results, taxonomy)
    assert validator(twice)["errors"] == []
    assert json.loads(twice.read_text())["images"][0]["detections"][0]["classifications"] == fox["classifications"]


def test_selection_by_threshold_and_category(tmp_path):
    md = read_detections(make_camera_folder(tmp_path))
    animals = select_detections(md, tmp_path)
    assert [f.frame for f in animals] == [0, 1, 3, 6, 7]
    assert [len(f.boxes) for f in animals] == [2, 1, 3, 1, 1]
    assert animals[0].path == str(tmp_path / "cam1" / "IMG_0001.JPG")
    assert [len(f.boxes) for f in select_detections(md, tmp_path, threshold=0.7)] == [1, 1, 2, 1, 1]
    people = select_detections(md, tmp_path, categories=["person", "3"])
    assert [(f.frame, [d for d, _ in f.boxes]) for f in people] == [(1, [1]), (5, [0])]
    with pytest.raises(DetectionsFileError, match="no detection category 'bird'.*animal \\(1\\)"):
        select_detections(md, tmp_path, categories=["bird"])


def _doc(**image) -> dict:
    entry = {"file": "cam1/a.jpg", "detections": [{"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2]}]}
    entry.update(image)
    ok = {"file": "cam1/ok.jpg", "detections": []}
    return {"info": {"format_version": "1.4"}, "detection_categories": {"1": "animal"}, "images": [ok, entry]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"detections": [{"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2]}]},
            r"detections\[0\]: bbox must be 4 numbers.*got 3 values",
        ),
        ({"detections": [{"category": "1", "bbox": [0.1, 0.1, 0.2, 0.2]}]}, r"detections\[0\]: missing 'conf'"),
        (
            {"detections": [{"category": "7", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2]}]},
            r"detections\[0\]: unknown category '7'.*1 \(animal\)",
        ),
        (
            {"detections": [{"category": "1", "conf": 0.9, "bbox": [10, 20, 300, 400]}]},
            r"detections\[0\]: bbox .* not normalised",
        ),
        (
            {"detections": [{"category": "1", "conf": 1.5, "bbox": [0.1, 0.1, 0.2, 0.2]}]},
            r"detections\[0\]: conf must be a number from 0 to 1, got 1.5",
        ),
        ({"detections": None}, r"no detections list"),
        ({"failure": 3}, r"failure must be a string"),
    ],
)
def test_malformed_entries_are_named(change, message):
    with pytest.raises(DetectionsFileError, match=r"md\.json: images\[1\] \('cam1/a\.jpg'\): " + message):
        parse_detections(_doc(**change), "md.json")


def test_malformed_files(tmp_path):
    bad = tmp_path / "md.json"
    bad.write_text('{"info": {"format_version": "1.4"},\n "images": [,]}')
    with pytest.raises(DetectionsFileError, match=r"md\.json is not JSON \(line 2, column 13"):
        read_detections(bad)
    with pytest.raises(DetectionsFileError, match="no such detections file"):
        read_detections(tmp_path / "missing.json")
    doc = _doc()
    del doc["images"][1]["file"]
    with pytest.raises(DetectionsFileError, match=r"images\[1\] has no 'file'"):
        parse_detections(doc, "md.json")
    doc = _doc()
    del doc["detection_categories"]
    with pytest.raises(DetectionsFileError, match="missing 'detection_categories'"):
        parse_detections(doc, "md.json")
    doc = _doc()
    doc["info"]["format_version"] = "2.0"
    with pytest.raises(DetectionsFileError, match="not 1.x"):
        parse_detections(doc, "md.json")
    with pytest.raises(DetectionsFileError, match="top level must be a JSON object"):
        parse_detections([1, 2], "md.json")
    doc = _doc()
    doc["detection_categories"] = {"animal": "1"}
    with pytest.raises(DetectionsFileError, match="category id 'animal' must be a non-negative integer"):
        parse_detections(doc, "md.json")


def test_videos_pass_through_and_keep_their_version(tmp_path, validator):
    doc = _doc()
    video = {
        "file": "cam1/clip.mp4",
        "frame_rate": 30,
        "frames_processed": [0, 30],
        "detections": [{"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2], "frame_number": 30}],
    }
    doc["images"].append(video)
    md = parse_detections(doc, "md.json")
    assert md.frames[2].is_video and [f.frame for f in select_detections(md, tmp_path)] == [1]
    out = classified_document(md, {}, None)  # nothing classified: the taxonomy is never asked
    assert out["info"]["format_version"] == "1.4" and out["images"][2] == video
    path = tmp_path / "out.json"
    path.write_text(json.dumps(out))
    assert validator(path)["errors"] == []


def test_classifications_of_other_tools_read_without_a_taxonomy():
    doc = _doc(
        detections=[{"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2], "classifications": [["3", 0.8]]}]
    )
    doc["classification_categories"] = {"3": "red fox"}
    doc["classification_category_descriptions"] = {"3": "5a565886;mammalia;carnivora;canidae;vulpes;vulpes;red fox"}
    taxonomy, results = read_classified(parse_detections(doc, "speciesnet.json"))
    assert not taxonomy.is_taxonomic and taxonomy.class_names == ["red fox"]
    assert answer(results[(1, 0)], taxonomy).name == "red fox"
