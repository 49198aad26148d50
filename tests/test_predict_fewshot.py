"""predict with species of the user's own (few-shot) and "unknown": one ranked list with the model's classes
(the user's species take their calibrated mass m, the model's classes share 1 - m), --only-extra, the unknown
threshold in the rows and the roll-up, the order with a location prior (the prior re-weights the model's classes,
the user's species have no range), files made by another model refused before any image is read, the real
command line, and the onnxruntime backend.

The model: `trained_checkpoint` (a backbone that tells apart six real photos, under a head that cannot tell its
four bird species apart). The user's species are three of those photos (views as references), strangers the
other three, so a stranger is outside every list: the model's and the user's."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hierax.errors import HieraxError
from hierax.geo import FitConfig, fit_prior, read_annotations
from hierax.inference import writers
from hierax.inference.predict import predict
from hierax.similar import UNKNOWN, ExtraSpecies, ModelMismatchError, OpenSet, fit_fewshot
from tests.predict_support import (
    HEAD_BIAS,
    NAMES,
    PLACES,
    ambiguous_checkpoint,
    gps_photo,
    photo_view,
    trained_checkpoint,
    write_world_annotations,
)
from tests.similar_support import real_photos

KNOWN, STRANGERS = ("chelsea", "coffee", "astronaut"), ("rocket", "flower", "china")
IMAGE_ONLY_PROBS = torch.softmax(torch.tensor(HEAD_BIAS), 0).numpy()
THRESHOLDS = {"species": 0.5, "genus": 0.6, "family": 0.4}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: these small networks run several times faster so on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The trained checkpoint, the user's species fitted on 4 views of each KNOWN photo, 3 new views of each
    KNOWN photo and of each stranger, and a location prior for the model's classes."""
    root = tmp_path_factory.mktemp("fewshot_predict")
    checkpoint = trained_checkpoint(root / "trained.safetensors")
    photos, rng = real_photos(), np.random.default_rng(100)
    queries = {}
    for name in KNOWN + STRANGERS:
        if name in KNOWN:
            for j in range(4):
                (root / "refs" / name).mkdir(parents=True, exist_ok=True)
                photo_view(photos[name], rng).save(root / "refs" / name / f"{j}.jpg", quality=85)
        for j in range(3):
            queries[f"{name}{j}"] = gps_photo(
                root / "queries" / f"{name}{j}.jpg", None, None, None, photo_view(photos[name], rng)
            )
    species_file = root / "species.safetensors"
    fit_fewshot(root / "refs", checkpoint, output=species_file, workers=0)
    records, _ = read_annotations(write_world_annotations(root / "train.json"), NAMES)
    fit_prior(records, FitConfig(epochs=8, batch_size=256, lr=3e-3), root / "prior.safetensors", progress=False)
    return root, checkpoint, species_file, queries, root / "prior.safetensors"


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["path"].rsplit("/", 1)[-1].removesuffix(".jpg"): r for r in rows}


def test_user_species_join_the_ranking_and_strangers_are_unknown(setup):
    root, checkpoint, species_file, _, _ = setup
    open_set = OpenSet.load(species_file)
    assert open_set.threshold == ExtraSpecies.load(species_file).unknown_threshold
    run = predict(
        [root / "queries"],
        checkpoint,
        open_set=open_set,
        top_k=3,
        rollup=True,
        thresholds=THRESHOLDS,
        workers=0,
        progress=False,
    )
    rows = by_name(run.rows)
    assert list(run.rows[0]) == [
        "path",
        *[f"{c}_{i}" for i in (1, 2, 3) for c in ("label", "prob", "origin")],
        "kingdom", "phylum", "class", "order", "family", "genus", "species",
        "prediction", "rollup_rank", "rollup_name", "rollup_prob", "extra_species_prob",
    ]  # fmt: skip
    for name, row in rows.items():
        own = name[:-1]
        if own in KNOWN:
            assert row["label_1"] == own and row["origin_1"] == "extra" and row["prediction"] == own, row
            assert row["prob_1"] >= open_set.threshold and row["species"] == ""  # no taxonomy for a user species
            assert (row["rollup_rank"], row["rollup_name"]) == ("species", own)
        else:
            assert row["prediction"] == UNKNOWN and row["prob_1"] < open_set.threshold, row
            assert row["rollup_name"] == UNKNOWN and row["rollup_rank"] == ""
        # the model's classes share 1 - m in the model's own proportions
        for i in (1, 2, 3):
            if row[f"origin_{i}"] == "model":
                share = IMAGE_ONLY_PROBS[NAMES.index(row[f"label_{i}"])]
                assert row[f"prob_{i}"] == pytest.approx((1 - row["extra_species_prob"]) * share, abs=2e-6)
    known_mass = [r["extra_species_prob"] for n, r in rows.items() if n[:-1] in KNOWN]
    stranger_mass = [r["extra_species_prob"] for n, r in rows.items() if n[:-1] in STRANGERS]
    assert min(known_mass) > 0.7 and max(stranger_mass) < min(known_mass)


def test_a_species_list_limits_the_model_classes_and_not_the_users(setup):
    root, checkpoint, species_file, _, _ = setup
    run = predict(
        [root / "queries"],
        checkpoint,
        open_set=OpenSet.load(species_file),
        species_list=[NAMES[0]],
        top_k=5,
        workers=0,
        progress=False,
    )
    assert "label_4" in run.rows[0] and "label_5" not in run.rows[0]  # one model class and three of the user's
    for row in run.rows:
        labels = [row[f"label_{i}"] for i in (1, 2, 3, 4)]
        assert sorted(labels) == sorted([NAMES[0], *KNOWN])
        model_prob = row[f"prob_{labels.index(NAMES[0]) + 1}"]
        assert model_prob == pytest.approx(1 - row["extra_species_prob"], abs=2e-6)  # all of 1 - m


def test_only_extra_and_a_threshold_on_the_model_alone(setup):
    root, checkpoint, species_file, _, prior = setup
    only = predict(
        [root / "queries"], checkpoint, open_set=OpenSet.load(species_file, only_extra=True), workers=0, progress=False
    )
    rows = by_name(only.rows)
    assert "species" not in only.rows[0] and {r["origin_1"] for r in rows.values()} == {"extra"}
    assert all(r["label_1"] in KNOWN and r["label_3"] in KNOWN for r in rows.values())
    assert [n for n, r in rows.items() if r["prediction"] != UNKNOWN] == [
        f"{n}{j}" for n in sorted(KNOWN) for j in range(3)
    ]
    # without species of their own, a threshold asks the model itself for a believable answer
    unsure = predict([root / "queries"], checkpoint, open_set=OpenSet(threshold=0.5), workers=0, progress=False)
    assert {r["prediction"] for r in unsure.rows} == {UNKNOWN} and "origin_1" not in unsure.rows[0]
    sure = predict([root / "queries"], checkpoint, open_set=OpenSet(threshold=0.3), workers=0, progress=False)
    assert {r["prediction"] for r in sure.rows} == {NAMES[1]}
    refused = {
        "--rollup works on the model's classes": dict(rollup=True),
        "--species-list works on": dict(species_list=NAMES[:2]),
        "--geo-prior works on": dict(geo_prior=prior),
    }
    for message, options in refused.items():
        with pytest.raises(HieraxError, match=message):
            predict([root / "queries"], checkpoint, open_set=OpenSet.load(species_file, only_extra=True), **options)
    with pytest.raises(HieraxError, match="give --extra-species"):
        OpenSet(only_extra=True)
    with pytest.raises(HieraxError, match=r"probability in \[0, 1\]"):
        OpenSet.load(species_file, threshold=1.5)


def test_files_of_another_model_are_refused_before_any_image_is_read(setup, tmp_path):
    root, checkpoint, species_file, _, _ = setup
    other = ambiguous_checkpoint(tmp_path / "other.safetensors", seed=1)
    out = tmp_path / "out.csv"
    open_set = OpenSet.load(species_file)
    with pytest.raises(ModelMismatchError, match="made by another model"):
        predict([root / "queries"], other, open_set=open_set, output=out, workers=0, progress=False)
    with pytest.raises(ModelMismatchError, match="without --tta"):
        predict([root / "queries"], checkpoint, open_set=open_set, tta=True, output=out, workers=0, progress=False)
    clashing = ExtraSpecies.load(species_file)
    clashing.class_names[0] = NAMES[0]
    with pytest.raises(HieraxError, match="named like model classes"):
        predict([root / "queries"], checkpoint, open_set=OpenSet(clashing), output=out, workers=0, progress=False)
    assert not list(tmp_path.glob("out*"))


def test_the_prior_reweights_the_model_classes_and_leaves_the_user_species(setup, tmp_path):
    _, checkpoint, species_file, queries, prior = setup
    photos = []
    for name in ("chelsea0", "rocket0"):  # the same pixels at two places, and nowhere
        for place in ("paris", "sydney", "nowhere"):
            lat, lon, when, _ = PLACES.get(place, (None, None, None, None))
            path = tmp_path / f"{name}_{place}.jpg"
            photos.append(gps_photo(path, lat, lon, when, image=_pixels(queries[name])))
    run = predict(photos, checkpoint, geo_prior=prior, open_set=OpenSet.load(species_file), workers=0, progress=False)
    rows = by_name(run.rows)
    assert run.located == 4 and not rows["chelsea0_nowhere"]["geo_prior_applied"]
    for name in ("chelsea0", "rocket0"):
        masses = [rows[f"{name}_{place}"]["extra_species_prob"] for place in ("paris", "sydney", "nowhere")]
        assert masses == pytest.approx([masses[2]] * 3, abs=1e-6)  # the user's species do not move with the place
    for place in ("paris", "sydney", "nowhere"):
        row = rows[f"chelsea0_{place}"]
        assert row["label_1"] == "chelsea" and row["prob_1"] == pytest.approx(
            rows["chelsea0_nowhere"]["prob_1"], abs=1e-6
        )
    # a stranger: the model's part follows the place, and the prior makes that answer believable
    assert rows["rocket0_nowhere"]["prediction"] == UNKNOWN
    for place, species in (("paris", 0), ("sydney", 1)):
        row = rows[f"rocket0_{place}"]
        assert row["label_1"] == NAMES[species] and row["origin_1"] == "model" and row["prediction"] == NAMES[species]


def _pixels(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def hierax(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HIERAX_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "hierax", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow
def test_the_command_line(setup, tmp_path, cli, monkeypatch):
    root, checkpoint, species_file, _, _ = setup
    out = tmp_path / "preds.jsonl"
    done = hierax(
        "predict",
        root / "queries",
        "--model",
        checkpoint,
        "--extra-species",
        species_file,
        "-o",
        out,
        "--workers",
        0,
        "--quiet",
        "--top-k",
        2,
    )
    assert done.returncode == 0, done.stderr
    rows = by_name(writers.read_rows(out))
    assert sorted(n for n, r in rows.items() if r["prediction"] == UNKNOWN) == [
        f"{n}{j}" for n in sorted(STRANGERS) for j in range(3)
    ]
    other = ambiguous_checkpoint(tmp_path / "other.safetensors", seed=1)
    monkeypatch.setenv("HIERAX_OFFLINE", "1")
    for args, message in [
        (("--model", other, "--extra-species", species_file), "made by another model"),
        (("--model", checkpoint, "--only-extra"), "give --extra-species"),
        (("--model", checkpoint, "--unknown-threshold", 2), "expected a probability in [0, 1]"),
    ]:
        refused = cli("predict", root / "queries", *args, "--quiet")
        assert refused.returncode != 0 and message in refused.stderr and "Traceback" not in refused.stderr, (
            refused.stderr
        )
        assert refused.stderr.strip().splitlines()[-1].startswith("hierax predict: error:")


@pytest.mark.slow
def test_geo_prior_and_user_species_on_the_onnxruntime_backend(setup, hierax_home):
    root, checkpoint, species_file, _, prior = setup
    options = dict(geo_prior=prior, location=PLACES["paris"][:2], workers=0, progress=False)
    base = predict([root / "queries"], checkpoint, open_set=OpenSet.load(species_file), **options)
    onnx = predict(
        [root / "queries"], checkpoint, open_set=OpenSet.load(species_file), backend="onnxruntime", **options
    )
    assert onnx.located == base.located == 18
    for got, want in zip(onnx.rows, base.rows, strict=True):
        assert got["label_1"] == want["label_1"] and got["prediction"] == want["prediction"]
        assert got["prob_1"] == pytest.approx(want["prob_1"], abs=1e-4)
        assert got["extra_species_prob"] == pytest.approx(want["extra_species_prob"], abs=1e-4)
