"""End to end through the real command line, in subprocesses: `hierax geoprior fit` on generated iNat21-format
records for a small checkpoint with iNat21-style classes whose image head cannot tell its species apart, then
`hierax predict --geo-prior` on copies of one real photo that differ only in their EXIF GPS and date (the answer
follows the place; a photo without EXIF and one with broken GPS keep their rows and the image's answer), the same
under torchrun with two ranks, and `hierax evaluate --geo-prior` with top-1/top-5 with and without the prior."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hierax.inference import writers
from tests.predict_support import (
    IMAGE_ONLY,
    NAMES,
    PLACES,
    ambiguous_checkpoint,
    broken_gps_photo,
    gps_photo,
    write_world_annotations,
    write_world_dataset,
)


def hierax(*args, module=("-m", "hierax")) -> subprocess.CompletedProcess:
    env = {**os.environ, "HIERAX_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, *module, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The checkpoint, the photos, and a prior fitted by `hierax geoprior fit`."""
    root = tmp_path_factory.mktemp("geo_cli")
    checkpoint = ambiguous_checkpoint(root / "tiny.safetensors")
    annotations = write_world_annotations(root / "train.json")
    for name, (lat, lon, when, _) in PLACES.items():
        gps_photo(root / "photos" / f"{name}.jpg", lat, lon, when)
    gps_photo(root / "photos" / "plain.jpg", None, None, None)
    broken_gps_photo(root / "photos" / "broken.jpg")
    prior = root / "prior.safetensors"
    common = ["--epochs", 8, "--batch-size", 256, "--lr", 3e-3, "--quiet"]
    done = hierax("geoprior", "fit", annotations, "--model", checkpoint, "--output", prior, *common)
    assert done.returncode == 0, done.stderr
    assert "800 of 800 records used, 4 of 4 model classes have records" in done.stdout
    return root, checkpoint, prior


def expected_labels() -> dict[str, str]:
    return {
        **{name: NAMES[place[3]] for name, place in PLACES.items()},
        "plain": NAMES[IMAGE_ONLY],
        "broken": NAMES[IMAGE_ONLY],
    }


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["path"].rsplit("/", 1)[-1].removesuffix(".jpg"): r for r in rows}


@pytest.mark.slow
def test_fit_then_predict_the_answer_follows_the_place(fitted):
    root, checkpoint, prior = fitted
    out = root / "pred.csv"
    done = hierax(
        "predict", root / "photos", "--model", checkpoint, "--geo-prior", prior, "-o", out, "--workers", 1, "--quiet"
    )
    assert done.returncode == 0, done.stderr
    rows = by_name(writers.read_rows(out))
    assert {name: row["label_1"] for name, row in rows.items()} == expected_labels()
    assert {name: row["geo_prior_applied"] for name, row in rows.items()} == {
        **dict.fromkeys(PLACES, "True"),
        "plain": "False",
        "broken": "False",
    }
    assert rows["plain"]["latitude"] == "" and float(rows["paris"]["latitude"]) == pytest.approx(48.8566, abs=1e-4)
    assert rows["dakota_january"]["date"] == "2021-01-15"
    assert "6 ok, 0 failed of 6 images" in done.stderr and "geo prior applied to 4 of 6" in done.stderr
    assert "1 with broken location or date metadata" in done.stderr
    assert f"WARNING {root / 'photos' / 'broken.jpg'}: EXIF GPS ignored: zero denominator" in done.stderr
    print("predict --geo-prior:", {n: (r["label_1"].split("_", 6)[-1], r["prob_1"]) for n, r in rows.items()})


@pytest.mark.slow
def test_torchrun_ranks_give_the_single_process_rows(fitted):
    root, checkpoint, prior = fitted
    out = root / "ddp.jsonl"
    args = ["predict", root / "photos", "--model", checkpoint, "--geo-prior", prior, "-o", out, "--workers", 0]
    done = hierax("--nproc-per-node", 2, "-m", "hierax", *args, "--quiet", module=("-m", "torch.distributed.run"))
    assert done.returncode == 0, done.stderr
    assert "geo prior applied to 4 of 6" in done.stderr and "1 with broken location" in done.stderr
    rows = writers.read_rows(out)
    assert [r["path"] for r in rows] == sorted(str(p) for p in (root / "photos").iterdir())
    assert {n: r["label_1"] for n, r in by_name(rows).items()} == expected_labels()
    assert sorted(p.name for p in root.glob("ddp*")) == ["ddp.errors.csv", "ddp.jsonl"]  # no rank parts left


@pytest.mark.slow
def test_evaluate_reports_top1_and_top5_with_and_without_the_prior(fitted):
    root, checkpoint, prior = fitted
    dataset = write_world_dataset(root / "val")
    done = hierax(
        "evaluate", dataset, "--model", checkpoint, "--geo-prior", prior, "--output-dir", root / "ev", "--quiet"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((root / "ev" / "report.json").read_text())
    geo = report["geo_prior"]
    assert (geo["evaluated"], geo["images_with_location"]) == (44, 40)
    located, everything = geo["with_location"], geo["all_images"]
    print(f"evaluate --geo-prior: {json.dumps(geo)}")
    assert located["image_only"]["top1"] < 0.5 and located["with_prior"]["top1"] >= 0.9
    assert everything["image_only"]["top1"] == pytest.approx(report["top1"])  # the image-only report
    assert located["with_prior"]["top5"] == located["image_only"]["top5"] == 1.0  # 4 classes
    assert "image only  with prior" in done.stdout and "40 of 44 images with a location" in done.stdout
