"""predict with a location prior, in process: where each photo's place and date come from (EXIF read in the
loader's workers, CSV columns, run-wide overrides), the rows and their place columns, broken GPS as a counted
and logged warning, and the prior with a species list, TTA and resume; bad options and files are refused before
any image is read. (The onnxruntime backend: test_predict_fewshot.py; the CLI and torchrun:
test_predict_geo_cli.py.)"""

from __future__ import annotations

import csv
import logging

import pytest
import torch

from hierax.errors import HieraxError
from hierax.geo import FitConfig, GeoPrior, combine, fit_prior, load_prior, read_annotations
from hierax.inference import writers
from hierax.inference.evaluate import evaluate, format_summary
from hierax.inference.place import PLACE_COLUMNS
from hierax.inference.predict import predict
from tests.conftest import inat_names
from tests.predict_support import (
    HEAD_BIAS,
    IMAGE_ONLY,
    NAMES,
    PLACES,
    ambiguous_checkpoint,
    broken_gps_photo,
    gps_photo,
    write_world_annotations,
    write_world_dataset,
)

IMAGE_ONLY_PROBS = torch.softmax(torch.tensor(HEAD_BIAS), 0).numpy()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: these small networks run several times faster so on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The ambiguous checkpoint, a prior fitted on the world's records, and the photos: one per place (EXIF GPS
    and date), one without EXIF and one with a broken GPS block."""
    root = tmp_path_factory.mktemp("geo_predict")
    checkpoint = ambiguous_checkpoint(root / "tiny.safetensors")
    records, _ = read_annotations(write_world_annotations(root / "train.json"), NAMES)
    config = FitConfig(epochs=8, batch_size=256, lr=3e-3)
    fit_prior(records, config, root / "prior.safetensors", progress=False)
    photos = {
        name: gps_photo(root / "photos" / f"{name}.jpg", lat, lon, when) for name, (lat, lon, when, _) in PLACES.items()
    }
    photos["plain"] = gps_photo(root / "photos" / "plain.jpg", None, None, None)
    photos["broken"] = broken_gps_photo(root / "photos" / "broken.jpg")
    return root, checkpoint, root / "prior.safetensors", photos


def other_prior(prior_path, path):
    """The fitted prior, saved as if fitted for a model with other classes."""
    prior = load_prior(prior_path)
    return GeoPrior(prior.net, inat_names(4), prior.columns, prior.uses_date).save(path)


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["path"].rsplit("/", 1)[-1].removesuffix(".jpg"): r for r in rows}


def test_the_answer_follows_the_place_and_photos_without_one_keep_the_image_answer(world, caplog):
    root, checkpoint, prior_path, photos = world
    alone = predict([root / "photos"], checkpoint, top_k=2, workers=0, progress=False)
    assert {r["label_1"] for r in alone.rows} == {NAMES[IMAGE_ONLY]} and "latitude" not in alone.rows[0]
    with caplog.at_level(logging.WARNING):
        run = predict([root / "photos"], checkpoint, geo_prior=prior_path, top_k=2, workers=1, progress=False)
    rows = by_name(run.rows)
    assert len(rows) == 6 and list(run.rows[0])[-len(PLACE_COLUMNS) :] == PLACE_COLUMNS
    prior = load_prior(prior_path)
    for name, (lat, lon, when, species) in PLACES.items():
        row = rows[name]
        assert row["label_1"] == NAMES[species], (name, row)
        assert row["geo_prior_applied"] is True and row["location_source"] == "exif"
        assert (row["latitude"], row["longitude"]) == pytest.approx((lat, lon), abs=1e-4)
        assert row["date"] == when.date().isoformat()
        expected = combine(IMAGE_ONLY_PROBS, prior.presence(lat, lon, when.date())[0])
        assert row["prob_1"] == pytest.approx(float(expected.max()), abs=1e-5)
        assert row["prob_1"] > 0.6  # from 0.22-0.33 on the image alone
    for name in ("plain", "broken"):
        row = rows[name]
        assert row["label_1"] == NAMES[IMAGE_ONLY] and row["geo_prior_applied"] is False
        assert row["latitude"] is None and row["location_source"] is None
        assert row["prob_1"] == pytest.approx(float(IMAGE_ONLY_PROBS.max()), abs=1e-5)
    assert rows["broken"]["date"] == "2021-06-01" and rows["plain"]["date"] is None
    assert (run.located, run.place_warnings) == (4, 1)
    assert "geo prior applied to 4 of 6" in run.line() and "1 with broken location or date metadata" in run.line()
    assert f"{photos['broken']}: EXIF GPS ignored: zero denominator" in caplog.text


def test_csv_columns_beat_exif_and_overrides_beat_both(world, tmp_path):
    root, checkpoint, prior_path, photos = world
    listing = tmp_path / "list.csv"
    with open(listing, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "latitude", "longitude", "date", "site"])
        out.writerow([photos["plain"], 48.85, 2.35, "2021-05-10", "A"])  # no EXIF: the CSV's place
        out.writerow([photos["sydney"], 44.0, -103.0, "2021-07-15", "B"])  # the CSV wins over EXIF
        out.writerow([photos["dakota_january"], "north", 3.0, "", "C"])  # broken: EXIF is used instead
    run = predict([listing], checkpoint, geo_prior=prior_path, workers=0, progress=False, top_k=1)
    rows = by_name(run.rows)
    assert rows["plain"]["label_1"] == NAMES[0] and rows["plain"]["location_source"] == "csv"
    assert rows["sydney"]["label_1"] == NAMES[2] and rows["sydney"]["date"] == "2021-07-15"
    assert rows["dakota_january"]["label_1"] == NAMES[3] and rows["dakota_january"]["location_source"] == "exif"
    assert (run.located, run.place_warnings) == (3, 1)

    fixed = predict(
        [root / "photos"],
        checkpoint,
        geo_prior=prior_path,
        location=(48.85, 2.35),
        date="2021-05-10",
        workers=0,
        progress=False,
    )
    assert all(r["label_1"] == NAMES[0] and r["location_source"] == "override" for r in fixed.rows)
    assert {r["date"] for r in fixed.rows} == {"2021-05-10"} and fixed.located == 6


def test_prior_with_species_list_tta_and_resume(world, tmp_path):
    root, checkpoint, prior_path, photos = world
    allowed = predict(
        [photos["paris"], photos["dakota_july"]],
        checkpoint,
        geo_prior=prior_path,
        species_list=NAMES[1:],
        tta=True,
        workers=0,
        progress=False,
    )
    paris, july = allowed.rows
    assert paris["label_1"] == NAMES[IMAGE_ONLY] and july["label_1"] == NAMES[2]  # the raven is not on the list
    assert {paris[f"label_{i}"] for i in (1, 2, 3)} == set(NAMES[1:]) and "label_4" not in paris
    out = tmp_path / "preds.parquet"
    first = predict([photos["paris"]], checkpoint, geo_prior=prior_path, output=out, workers=0, progress=False)
    assert first.succeeded == 1
    resumed = predict(
        [root / "photos"], checkpoint, geo_prior=prior_path, output=out, resume=True, workers=0, progress=False
    )
    assert (resumed.skipped, resumed.succeeded, resumed.located) == (1, 5, 3)
    rows = by_name(writers.read_rows(out))
    assert len(rows) == 6 and {n: r["label_1"] for n, r in rows.items()} == {
        **{name: NAMES[place[3]] for name, place in PLACES.items()},
        "plain": NAMES[IMAGE_ONLY],
        "broken": NAMES[IMAGE_ONLY],
    }


def test_bad_priors_and_options_are_refused_before_any_image_is_read(world, tmp_path):
    root, checkpoint, prior_path, _ = world
    out = tmp_path / "out.csv"
    other_prior(prior_path, tmp_path / "other.safetensors")
    cases = {
        "geo prior not found": dict(geo_prior=tmp_path / "nope.safetensors"),
        "is not a hierax geo prior": dict(geo_prior=checkpoint),
        "shares no class with this model": dict(geo_prior=tmp_path / "other.safetensors"),
        "give --geo-prior PRIOR as well": dict(location=(10.0, 20.0)),
        "is off the globe": dict(geo_prior=prior_path, location=(95.0, 20.0)),
        "is not a date": dict(geo_prior=prior_path, date="July"),
    }
    for message, options in cases.items():
        with pytest.raises(HieraxError, match=message):
            predict([root / "photos"], checkpoint, output=out, workers=0, progress=False, **options)
        assert not list(tmp_path.glob("out*")), message


def test_evaluate_puts_the_prior_beside_the_image_alone(world, tmp_path):
    _, checkpoint, prior_path, _ = world
    dataset = write_world_dataset(tmp_path / "val", n=24, unlocated=2)
    report = evaluate(dataset, checkpoint, geo_prior=prior_path, workers=0, progress=False)
    geo = report["geo_prior"]
    assert (geo["evaluated"], geo["images_with_location"], geo["broken_metadata"]) == (26, 24, 0)
    assert geo["all_images"]["image_only"]["top1"] == pytest.approx(report["top1"])
    assert geo["with_location"]["image_only"]["top1"] < 0.5 <= 0.9 <= geo["with_location"]["with_prior"]["top1"]
    assert "top-1, with a location" in format_summary(report)
    plain = evaluate(dataset, checkpoint, workers=0, progress=False)
    assert "geo_prior" not in plain and plain["top1"] == report["top1"]
    with pytest.raises(HieraxError, match="shares no class"):
        evaluate(dataset, checkpoint, geo_prior=other_prior(prior_path, tmp_path / "o.safetensors"), workers=0)
