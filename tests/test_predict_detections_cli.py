"""The camera-trap chain through the real commands: MegaDetector file -> `hierax predict ROOT --detections` ->
MegaDetector's validator -> `hierax camtrapdp` -> frictionless; the row tables and flags; torchrun with 2 ranks."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from hierax.cli import main
from hierax.inference import writers
from hierax.interchange.classified import read_classified
from hierax.interchange.megadetector import read_detections
from tests.data_fixtures import make_checkpoint

from .interchange_support import (
    CLASS_NAMES,
    classify_detections,
    frictionless_report,
    make_camera_folder,
    megadetector_validator,
)


def hierax(*args, module=("-m", "hierax")) -> subprocess.CompletedProcess:
    env = {**os.environ, "HIERAX_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *module, *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Camera folders, their MegaDetector file and a checkpoint of the same network as interchange_support's."""
    root = tmp_path_factory.mktemp("chain")
    md = make_camera_folder(root / "traps")
    return root, md, make_checkpoint(root / "tiny.pt", size=64, class_names=CLASS_NAMES)


def test_megadetector_file_to_camtrap_dp_through_the_commands(setup, capsys):
    root, md_path, checkpoint = setup
    out = root / "hierax.json"
    args = ["predict", root / "traps", "--detections", md_path, "--model", checkpoint, "-o", out]
    result = hierax(*args, "--top-k", "3", "--rollup", "--thresholds", "species=0.8,genus=0.6", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "7 boxes classified; 7 images ok, 1 failed of 9" in result.stderr and "hierax.events.csv" in result.stderr
    report = megadetector_validator()(out)
    assert report["errors"] == [] and report["warnings"] == []

    # The same answers as the crop pipeline with the same weights, in this process.
    _, want, _, _ = classify_detections(md_path, root / "traps")
    taxonomy, got = read_classified(read_detections(out))
    assert set(got) == set(want)
    for key, c in want.items():
        names = [taxonomy.class_names[i].split("_", 1)[1] for i in got[key].indices]
        assert names == [CLASS_NAMES[i].split("_", 1)[1] for i in c.indices]
        assert got[key].probs == pytest.approx(c.probs, abs=1e-4)
        assert (got[key].rollup.rank, got[key].rollup.name) == (c.rollup.rank, c.rollup.name)
    with open(root / "hierax.events.csv", newline="") as fh:
        events = list(csv.DictReader(fh))
    assert {e["camera"] for e in events} == {"cam1", "cam2"} and sum(int(e["detections"]) for e in events) == 7

    # hierax camtrapdp reads what predict wrote; frictionless checks the tables, their types and keys.
    package = root / "pkg"
    assert main(["camtrapdp", str(out), "--output", str(package), "--latitude", "52.1", "--longitude", "5.2"]) == 0
    capsys.readouterr()
    check = frictionless_report(package, root / "check")
    assert check.valid, check.flatten(["rowNumber", "fieldName", "type", "message"])
    with open(package / "observations.csv", newline="") as fh:
        observations = list(csv.DictReader(fh))
    animals = [o for o in observations if o["observationType"] == "animal" and o["observationLevel"] == "media"]
    assert len(animals) == 7 and all(o["classificationMethod"] == "machine" for o in animals)


def test_row_tables_and_options_through_the_command(setup, tmp_path, capsys):
    root, md_path, checkpoint = setup
    common = ["--model", str(checkpoint), "--workers", "0", "--quiet"]
    out = tmp_path / "boxes.parquet"
    code = main(
        [
            "predict",
            str(root / "traps"),
            "--detections",
            str(md_path),
            *common,
            "-o",
            str(out),
            "--detection-threshold",
            "0.6",
            "--classify-categories",
            "animal, vehicle",
            "--crop",
            "tight:0",
            "--event-gap",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    rows = writers.read_rows(out)
    assert {r["category"] for r in rows} == {"animal", "vehicle"} and min(r["detection_conf"] for r in rows) >= 0.6
    assert len(writers.read_rows(tmp_path / "boxes.images.parquet")) == 9
    events = writers.read_rows(tmp_path / "boxes.events.parquet")
    assert len([e for e in events if e["camera"] == "cam1"]) == 4  # a 1 s gap splits frames 2 s apart
    doc = json.loads(md_path.read_text())
    assert doc["images"][0]["detections"][0]["conf"] == 0.93  # the detector's file is never changed

    code = main(["predict", str(root / "traps"), "--detections", str(md_path), *common])  # to stdout
    printed = capsys.readouterr().out.splitlines()
    assert code == 0 and printed[0].startswith("path,file,detection,category") and len(printed) == 8

    for argv, message in (
        (["predict", str(root / "traps"), str(md_path), "--detections", str(md_path)], "give one path"),
        (["predict", str(root / "traps"), "--crop", "tight"], "only work with --detections"),
        (["predict", str(root / "traps"), "--detections", str(md_path), "-o", str(tmp_path / "x.npy")], "format"),
    ):
        assert main([*argv, *common]) == 1
        assert message in capsys.readouterr().err


EVENT_COLUMNS = ("event_id", "camera", "start", "end", "frames", "detections", "count", "name", "rank")


def _events(path) -> list[tuple]:
    with open(path, newline="") as fh:
        return [tuple(r[c] for c in EVENT_COLUMNS) for r in csv.DictReader(fh)]


@pytest.mark.slow
def test_torchrun_two_ranks_gather_on_rank_zero(setup, tmp_path):
    root, md_path, checkpoint = setup
    model = ["--model", str(checkpoint), "--workers", "0", "--quiet"]
    for stem, suffix in (("json", ".json"), ("rows", ".csv")):
        one, two = tmp_path / f"one_{stem}{suffix}", tmp_path / f"two_{stem}{suffix}"
        assert main(["predict", str(root / "traps"), "--detections", str(md_path), "-o", str(one), *model]) == 0
        torchrun = ("-m", "torch.distributed.run")
        args = ["--nproc-per-node", "2", "-m", "hierax", "predict", root / "traps", "--detections", md_path]
        result = hierax(*args, "-o", two, *model, module=torchrun)
        assert result.returncode == 0, result.stderr
        assert "7 boxes classified; 7 images ok, 1 failed of 9" in result.stderr
        errors = writers.read_errors(tmp_path / f"two_{stem}.errors.csv")
        assert [p for p, _ in errors] == [str(root / "traps" / "cam2" / "broken.JPG")]
        assert _events(tmp_path / f"two_{stem}.events.csv") == _events(tmp_path / f"one_{stem}.events.csv")
    _, want = read_classified(read_detections(tmp_path / "one_json.json"))
    _, got = read_classified(read_detections(tmp_path / "two_json.json"))
    assert {k: c.indices[0] for k, c in got.items()} == {k: c.indices[0] for k, c in want.items()}
    rows = [writers.read_rows(tmp_path / f"{who}_rows.csv") for who in ("two", "one")]
    assert [(r["file"], r["detection"], r["label_1"]) for r in rows[0]] == [
        (r["file"], r["detection"], r["label_1"]) for r in rows[1]
    ]
    images = [writers.read_rows(tmp_path / f"{who}_rows.images.csv") for who in ("two", "one")]
    assert images[0] == images[1]
    assert sorted(p.name for p in tmp_path.glob("two_*")) == [
        "two_json.errors.csv",
        "two_json.events.csv",
        "two_json.json",
        "two_rows.csv",
        "two_rows.errors.csv",
        "two_rows.events.csv",
        "two_rows.images.csv",
    ]
