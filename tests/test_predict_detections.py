"""`predict_detections`: every MegaDetector box classified as the crop pipeline does it, with the image summary,
events (EXIF times first), --resume of the row tables, the geo prior at each frame's place, and XMP sidecars."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from hierax.data.metadata import read_capture
from hierax.errors import HieraxError
from hierax.geo import GeoPrior, PresenceNet, combine, load_prior
from hierax.inference import writers
from hierax.inference.detections import predict_detections
from hierax.interchange.megadetector import read_detections

from .interchange_support import (
    CLASS_NAMES,
    EXIF_DAY,
    EXIF_PLACE,
    START,
    camera_exif,
    classify_detections,
    make_camera_folder,
    megadetector_validator,
    tiny_model,
)

EXIFTOOL = shutil.which("exiftool")
RUN = {"workers": 0, "progress": False, "top_k": 3}


@pytest.fixture(scope="module")
def traps(tmp_path_factory):
    root = tmp_path_factory.mktemp("traps")
    return root, make_camera_folder(root, exif=True)


def _key(row) -> tuple[str, int]:
    return row["file"], int(row["detection"])


def test_boxes_tables_and_json_as_the_crop_pipeline_makes_them(traps, tmp_path):
    root, md_path = traps
    md, want, failures, _ = classify_detections(md_path, root, rollup=False)
    summary = predict_detections(root, md_path, tiny_model(), output=tmp_path / "out.csv", **RUN)
    assert (summary.total, summary.succeeded, summary.failed, summary.crops) == (9, 7, 1, 7)
    rows = writers.read_rows(tmp_path / "out.csv")
    got = {_key(r): r for r in rows}
    assert len(rows) == len(want) == 7
    for (i, j), c in want.items():
        row = got[(md.frames[i].file, j)]
        assert row["label_1"] == CLASS_NAMES[c.indices[0]]
        assert float(row["prob_1"]) == pytest.approx(c.probs[0], abs=1e-5)  # batches of other sizes
        assert [float(row[f"bbox_{s}"]) for s in ("x", "y", "width", "height")] == list(md.frames[i].detections[j].bbox)
    assert [p for p, _ in writers.read_errors(tmp_path / "out.errors.csv")] == [str(root / "cam2" / "broken.JPG")]

    images = writers.read_rows(tmp_path / "out.images.csv")
    assert [r["file"] for r in images] == [f.file for f in md.frames]
    assert [r["status"] for r in images][-2:] == ["failed", "failed"] and images[2]["blank"] == "True"
    events = writers.read_rows(tmp_path / "out.events.csv")
    cam1 = [e for e in events if e["camera"] == "cam1"]
    assert [(e["start"], e["time_source"], e["frames"]) for e in cam1] == [
        ((START + EXIF_DAY).isoformat(), "exif", "3"),  # EXIF DateTimeOriginal, not the file time a day before
        ((START + EXIF_DAY + dt.timedelta(seconds=600)).isoformat(), "exif", "1"),
    ]
    assert {e["time_source"] for e in events if e["camera"] == "cam2" and e["start"]} == {"file"}
    assert {r["event_id"] for r in images} == {e["event_id"] for e in events}

    # The same run to MegaDetector's format: every image kept, the broken one failed, MegaDetector's validator happy.
    summary = predict_detections(root, md_path, tiny_model(), output=tmp_path / "out.json", rollup=True, **RUN)
    assert summary.events_output == tmp_path / "out.events.csv" and summary.images_output is None
    report = megadetector_validator()(tmp_path / "out.json")
    assert report["errors"] == [] and report["warnings"] == []
    doc = json.loads((tmp_path / "out.json").read_text())
    assert [e["file"] for e in doc["images"]] == [f.file for f in md.frames]
    assert doc["images"][7]["failure"] == "image access failure" and doc["images"][7]["detections"] is None
    assert doc["images"][0]["datetime_source"] == "exif"
    meta = doc["info"]["classifier_metadata"]
    assert meta["crop"] == "square:0.1:pad" and meta["detection_threshold"] == 0.2 and meta["top_k"] == 3
    first = doc["images"][0]["detections"][0]["classifications"]
    assert [int(k) for k, _ in first] == list(want[(0, 0)].indices)

    # Without an output the three tables come back in memory.
    summary = predict_detections(root, md_path, tiny_model(), **RUN)
    assert len(summary.rows) == 7 and len(summary.images) == 9 and len(summary.events) == len(events)


def test_resume_classifies_only_what_is_left_and_rebuilds_the_tables(traps, tmp_path):
    root, md_path = traps
    fresh = predict_detections(root, md_path, tiny_model(), output=tmp_path / "fresh.parquet", rollup=True, **RUN)
    # An interrupted run: only cam1's frames were done, and their rows wait in the unfinished state.
    doc = json.loads(md_path.read_text())
    doc["images"] = [e for e in doc["images"] if e["file"].startswith("cam1/")]
    part = tmp_path / "cam1.json"
    part.write_text(json.dumps(doc))
    out = tmp_path / "out.parquet"
    predict_detections(root, part, tiny_model(), output=out, rollup=True, **RUN)
    out.rename(tmp_path / "kept.parquet")
    writers.parts_dir(out).mkdir()
    shutil.move(tmp_path / "kept.parquet", writers.parts_dir(out) / "part-000000.parquet")

    resumed = predict_detections(root, md_path, tiny_model(), output=out, rollup=True, resume=True, **RUN)
    assert resumed.skipped == 3 and resumed.crops == 1  # cam1's three frames with boxes; cam2's one animal
    rows, want = writers.read_rows(out), writers.read_rows(tmp_path / "fresh.parquet")
    assert sorted(map(_key, rows)) == sorted(map(_key, want)) and len(rows) == fresh.crops
    for name in ("images", "events"):
        got, expected = (writers.read_rows(tmp_path / f"{stem}.{name}.parquet") for stem in ("out", "fresh"))
        assert [_rounded(r) for r in got] == [_rounded(r) for r in expected]  # probabilities read back at 6 decimals
    with pytest.raises(HieraxError, match="written once"):
        predict_detections(root, md_path, tiny_model(), output=tmp_path / "x.json", resume=True, **RUN)


def _rounded(row: dict) -> dict:
    """A row at 4 decimals, without the labels of zero probability (their order is a tie)."""
    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
    return {k: v for k, v in out.items() if not (k.startswith("label_") and out[k.replace("label", "prob")] == 0)}


def _scene(seed: int, at: tuple[int, int], patch: np.ndarray, size=(480, 360)) -> np.ndarray:
    """A noise frame with the photo patch pasted at (x, y), clipped at the frame's edges."""
    w, h = size
    frame = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    x, y = at
    sx, sy, dx, dy = max(0, -x), max(0, -y), max(0, x), max(0, y)
    pw, ph = min(patch.shape[1] - sx, w - dx), min(patch.shape[0] - sy, h - dy)
    frame[dy : dy + ph, dx : dx + pw] = patch[sy : sy + ph, sx : sx + pw]
    return frame


def test_a_box_around_the_same_pixels_gets_the_same_answer_anywhere(tmp_path):
    patch = np.ascontiguousarray(skdata.chelsea()[40:200, 120:280])  # 160 px of a real cat
    box = (50, 40, 60, 80)  # x, y, w, h inside the patch: the square window with 10% context is 32..128
    places = [(0, 0), (300, 150), (-32, -32), (352, 232)]  # the last two put the window at the frame's edges
    images = []
    for n, at in enumerate(places):
        name = f"f{n}.png"  # lossless: JPEG blocks would differ with the position
        Image.fromarray(_scene(n, at, patch)).save(tmp_path / name)
        bbox = [(at[0] + box[0]) / 480, (at[1] + box[1]) / 360, box[2] / 480, box[3] / 360]
        images.append({"file": name, "detections": [{"category": "1", "conf": 0.9, "bbox": bbox}]})
    doc = {"info": {"format_version": "1.4"}, "detection_categories": {"1": "animal"}, "images": images}
    (tmp_path / "md.json").write_text(json.dumps(doc))
    net, info = tiny_model()
    with torch.no_grad():
        net.classifier.weight.div_(400.0)  # soft answers: equal probabilities are then a real check
    summary = predict_detections(tmp_path, tmp_path / "md.json", (net, info), top_k=6, workers=0, progress=False)
    probs = [[r[f"prob_{i}"] for i in range(1, 7)] for r in summary.rows]
    labels = [[r[f"label_{i}"] for i in range(1, 7)] for r in summary.rows]
    assert len(probs) == 4 and probs[0][0] < 0.9
    assert all(p == probs[0] for p in probs) and all(lab == labels[0] for lab in labels)


def _prior(path) -> str:
    torch.manual_seed(3)
    net = PresenceNet(6, len(CLASS_NAMES), hidden=16, blocks=2)
    with torch.no_grad():
        net.head.bias.normal_(0, 3)  # presence far from 1 for some species
    GeoPrior(net, list(CLASS_NAMES), np.arange(len(CLASS_NAMES)), True).save(path)
    return str(path)


def _all_probs(rows) -> dict:
    """(file, detection) -> probabilities in class order, from top-6 rows."""
    out = {}
    for r in rows:
        p = np.zeros(len(CLASS_NAMES))
        for i in range(1, 7):
            p[CLASS_NAMES.index(r[f"label_{i}"])] = r[f"prob_{i}"]
        out[_key(r)] = p
    return out


def test_geo_prior_at_each_frames_place_and_date(traps, tmp_path, caplog):
    root, md_path = traps
    net, info = tiny_model()
    with torch.no_grad():
        net.classifier.weight.div_(400.0)
    prior_path = _prior(tmp_path / "prior.safetensors")
    options = {"workers": 0, "progress": False, "top_k": 6}
    plain = _all_probs(predict_detections(root, md_path, (net, info), **options).rows)
    with caplog.at_level(logging.INFO, logger="hierax.inference.detections"):
        by_exif = _all_probs(predict_detections(root, md_path, (net, info), geo_prior=prior_path, **options).rows)
    located = sum(file.startswith("cam1/") for file, _ in plain)
    assert 0 < located < len(plain)
    assert f"geo prior applied to {located} of {len(plain)} crops" in caplog.text
    prior = load_prior(prior_path)
    for (file, j), p in plain.items():
        if file.startswith("cam1/"):  # EXIF GPS and DateTimeOriginal
            when = (START + EXIF_DAY).date()
            want = combine(p, prior.presence(*EXIF_PLACE, date=[when])[0])
            assert by_exif[(file, j)] == pytest.approx(want, abs=2e-5)
            assert not np.allclose(by_exif[(file, j)], p, atol=1e-3)
        else:  # no place known: the image alone
            assert by_exif[(file, j)] == pytest.approx(p, abs=1e-6)
    # A place and a date for the whole run win over EXIF.
    given = predict_detections(
        root, md_path, (net, info), geo_prior=prior_path, location=(-33.9, 18.4), date="2024-01-15", **options
    )
    presence = prior.presence(-33.9, 18.4, date=[dt.date(2024, 1, 15)])[0]
    for key, p in _all_probs(given.rows).items():
        assert p == pytest.approx(combine(plain[key], presence), abs=2e-5)


def _exif_subjects(path) -> list[str]:
    out = subprocess.run([EXIFTOOL, "-j", "-XMP-dc:Subject", str(path)], capture_output=True, text=True, check=True)
    value = json.loads(out.stdout)[0].get("Subject", [])
    return value if isinstance(value, list) else [value]


@pytest.mark.skipif(EXIFTOOL is None, reason="exiftool (libimage-exiftool-perl) is not installed")
def test_sidecars_name_every_species_of_a_frame_and_bad_ones_do_not_stop_the_run(traps, tmp_path):
    root = tmp_path / "traps"
    shutil.copytree(traps[0], root)
    md = read_detections(root / "md.json")
    before = (root / "cam1" / "IMG_0004.JPG").read_bytes()
    (root / "cam2" / "IMG_0002.JPG.xmp").write_text("<x:xmpmeta broken")  # not XML: left as it is
    (root / "cam2" / "IMG_0003.JPG.xmp").mkdir()  # something in the way of the sidecar
    summary = predict_detections(root, root / "md.json", tiny_model(), output=tmp_path / "o.csv", xmp=True, **RUN)
    assert summary.succeeded == 7
    rows = writers.read_rows(tmp_path / "o.csv")
    species = {r["species"] for r in rows if r["file"] == "cam1/IMG_0004.JPG"}
    assert len(species) == 2 and sorted(_exif_subjects(root / "cam1" / "IMG_0004.JPG.xmp")) == sorted(species)
    assert _exif_subjects(root / "cam1" / "IMG_0003.JPG.xmp") == []  # blank: a sidecar without species
    assert (root / "cam1" / "IMG_0004.JPG").read_bytes() == before
    assert (root / "cam2" / "IMG_0002.JPG.xmp").read_text() == "<x:xmpmeta broken"
    errors = dict(writers.read_errors(tmp_path / "o.errors.csv"))
    assert set(errors) == {str(root / "cam2" / n) for n in ("broken.JPG", "IMG_0002.JPG", "IMG_0003.JPG")}
    assert "not readable XML" in errors[str(root / "cam2" / "IMG_0002.JPG")]
    assert not (root / "cam2" / "broken.JPG.xmp").exists() and len(md.frames) == 9
    if os.geteuid() != 0:  # root writes into read-only folders
        (root / "cam1").chmod(0o555)
        try:
            predict_detections(root, root / "md.json", tiny_model(), output=tmp_path / "p.csv", xmp=True, **RUN)
        finally:
            (root / "cam1").chmod(0o755)
        assert sum("cam1" in p for p, _ in writers.read_errors(tmp_path / "p.errors.csv")) == 4


def test_checks_come_before_the_model(traps, tmp_path):
    root, md_path = traps
    missing = tmp_path / "no-model.pt"

    def fails(message, **kwargs):
        with pytest.raises(HieraxError, match=message):
            predict_detections(kwargs.pop("root", root), kwargs.pop("md", md_path), missing, **kwargs)

    fails("unsupported output format", output=tmp_path / "x.txt")
    fails("bad crop policy", crop="round:0.1:pad:x")
    fails("no detection category 'bird'", categories=["bird"])
    fails("not a folder", root=md_path)
    fails("no such detections file", md=tmp_path / "none.json")
    fails("event gap", event_gap=-1)
    fails("off the globe", location=(95, 0))
    fails("no-model.pt")  # and only then the model


def test_the_camera_exif_helper_writes_what_hierax_reads(tmp_path):
    img = tmp_path / "exif.jpg"
    Image.new("RGB", (8, 8)).save(img, exif=camera_exif(START, -1.5, 2.25))
    capture = read_capture(img)
    assert capture.time == START and (capture.latitude, capture.longitude) == pytest.approx((-1.5, 2.25), abs=1e-5)
