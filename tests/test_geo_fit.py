"""The prior learns the generated world: fitted from an iNat21-format file, its top-1 on held-out points is far
above chance and close to the generator's Bayes rate, the date separates species that share a range, and
combining it with a classifier that confuses look-alikes from other continents fixes most of their mistakes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hierax.data.metadata import capture_context
from hierax.errors import CheckpointError, HieraxError
from hierax.geo import FitConfig, combine, fit_prior, read_annotations, read_class_names
from hierax.geo.annotations import annotation_rows
from hierax.geo.fit import PriorFitter, state_path_for
from tests.data_fixtures import make_checkpoint
from tests.test_geo_synthetic import (
    bayes_rate,
    class_names,
    date_text,
    lookalike,
    make_world,
    sample,
    write_annotations,
)

TRAIN, HELD_OUT = 6000, 3000
CONFIG = {"epochs": 10, "batch_size": 256, "lr": 3e-3}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("geo")
    world = make_world()
    names = class_names(world)
    path = write_annotations(tmp / "train.json", world, *sample(world, TRAIN, seed=1), extra_categories=2, unlocated=3)
    records, summary = read_annotations(path, names)
    prior = fit_prior(records, FitConfig(**CONFIG), tmp / "prior.safetensors", progress=False)
    return world, prior, summary, tmp


def confusable_probs(world, labels, rng) -> np.ndarray:
    """An image classifier that splits its belief between the true species and its look-alike on another
    continent, preferring the look-alike half of the time."""
    n, c = len(labels), len(world)
    probs = np.full((n, c), 0.1 / (c - 2))
    true_share = rng.uniform(0.25, 0.65, size=n)
    partners = np.array([lookalike(world, s) for s in labels])
    probs[np.arange(n), labels] = true_share
    probs[np.arange(n), partners] = 0.9 - true_share
    return probs


@pytest.mark.slow
def test_prior_alone_approaches_the_bayes_rate(fitted):
    world, prior, summary, _ = fitted
    assert summary.used == TRAIN and summary.unmatched == 2 and summary.unmatched_categories == 2
    assert summary.no_location == 2 and summary.bad_location == 1 and summary.classes_with_records == len(world)
    lat, lon, day, labels = sample(world, HELD_OUT, seed=99)
    presence = prior.presence(lat, lon, [date_text(d) for d in day])
    top1 = float(np.mean(presence.argmax(axis=1) == labels))
    bayes, chance = bayes_rate(world, lat, lon, day), 1 / len(world)
    print(f"prior top-1 {top1:.3f}, Bayes rate {bayes:.3f}, chance {chance:.3f}")
    assert top1 > 15 * chance
    assert top1 > bayes - 0.07

    seasonal = np.isin(labels, [s.index for s in world if s.months])
    undated = prior.presence(lat[seasonal], lon[seasonal])  # the best month: the pairs look alike
    undated_top1 = float(np.mean(undated.argmax(axis=1) == labels[seasonal]))
    dated_top1 = float(np.mean(presence[seasonal].argmax(axis=1) == labels[seasonal]))
    print(f"seasonal species: top-1 {dated_top1:.3f} with the date, {undated_top1:.3f} without")
    assert dated_top1 > undated_top1 + 0.2


@pytest.mark.slow
def test_combining_fixes_look_alikes_from_other_continents(fitted):
    world, prior, _, _ = fitted
    lat, lon, day, labels = sample(world, HELD_OUT, seed=7)
    probs = confusable_probs(world, labels, np.random.default_rng(0))
    combined = combine(probs, prior.presence(lat, lon, [date_text(d) for d in day]))
    image_top1 = float(np.mean(probs.argmax(axis=1) == labels))
    combined_top1 = float(np.mean(combined.argmax(axis=1) == labels))
    print(f"image-only top-1 {image_top1:.3f}, with the prior {combined_top1:.3f}")
    assert 0.4 < image_top1 < 0.6
    assert combined_top1 > image_top1 + 0.35
    assert np.allclose(combined.sum(axis=1), 1.0, atol=1e-5)


def test_classes_come_from_a_checkpoint_or_a_list(tmp_path):
    names = class_names(make_world())
    checkpoint = make_checkpoint(tmp_path / "tiny.pt", class_names=names)
    assert read_class_names(checkpoint) == names
    (tmp_path / "classes.txt").write_text("# the model's classes\n" + "\n".join(names) + "\n")
    assert read_class_names(tmp_path / "classes.txt") == names
    (tmp_path / "classes.json").write_text(f'{{"{names[1]}": 1, "{names[0]}": 0}}')
    assert read_class_names(tmp_path / "classes.json") == names[:2]
    (tmp_path / "bad.json").write_text('{"a": 0, "b": 5}')
    with pytest.raises(HieraxError, match="without gaps"):
        read_class_names(tmp_path / "bad.json")
    with pytest.raises(HieraxError, match="no such class list"):
        read_class_names(tmp_path / "missing.txt")


def test_categories_match_binomials_and_bad_records_are_counted(tmp_path):
    world = make_world()
    lat, lon, day, labels = sample(world, 300, seed=3)
    path = write_annotations(tmp_path / "a.json", world, lat, lon, day, labels, extra_categories=3, unlocated=6)
    binomials = [f"{s.genus} {s.epithet}" for s in world][:10]  # a model with plain binomial class names
    records, summary = read_annotations(path, binomials)
    known = labels < 10
    assert summary.used == int(known.sum()) == len(records)
    assert set(records.label.tolist()) <= set(range(10))
    # The unlocated records reuse the first six labels; every third one has a garbage latitude.
    assert summary.no_location == sum(1 for k in range(6) if known[k] and k % 3 != 1)
    assert summary.bad_location == sum(1 for k in range(6) if known[k] and k % 3 == 1)
    assert summary.unmatched == int((~known).sum()) + 3 + int((~known[:6]).sum()) and summary.missing_image == 0
    assert summary.unmatched_categories == len(world) - 10 + 3
    assert records.common_names[0] == "Bird 0"
    undated, undated_summary = read_annotations(path, binomials, use_date=False)
    assert len(undated) == len(records) and undated_summary.no_date == 0
    assert any("match no model class" in line for line in summary.lines())

    rows = annotation_rows(path, root="/data")  # what evaluate needs per image path
    first = capture_context(None, rows[f"/data/train/{world[labels[0]].dir_name}/0.jpg"])
    assert (first.latitude, first.location_source) == (round(float(lat[0]), 5), "csv")
    assert first.date.timetuple().tm_yday == day[0] + 1


def test_annotation_files_that_cannot_be_fitted(tmp_path):
    names = class_names(make_world())
    with pytest.raises(HieraxError, match="no such annotation file"):
        read_annotations(tmp_path / "missing.json", names)
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    with pytest.raises(HieraxError, match="not an iNat21-format annotation file"):
        read_annotations(tmp_path / "list.json", names)
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(HieraxError, match="not valid JSON"):
        read_annotations(tmp_path / "broken.json", names)
    path = write_annotations(tmp_path / "a.json", make_world(), *sample(make_world(), 50, seed=4))
    with pytest.raises(HieraxError, match="no category matches a class of the model"):
        read_annotations(path, ["Alces alces", "Ursus arctos"])


def test_a_fit_state_resumes_only_the_same_fit(tmp_path):
    world = make_world()
    records, _ = read_annotations(
        write_annotations(tmp_path / "a.json", world, *sample(world, 200, seed=5)), class_names(world)
    )
    other, _ = read_annotations(
        write_annotations(tmp_path / "b.json", world, *sample(world, 200, seed=6)), class_names(world)
    )
    config = FitConfig(epochs=1, batch_size=50)
    fitter = PriorFitter(records, config)
    fitter.train_step()
    fitter.save_state(tmp_path / "state.pt")
    resumed = PriorFitter(records, config)
    resumed.load_state(tmp_path / "state.pt")
    assert resumed.step == 1 and all(
        torch.equal(a, b) for a, b in zip(resumed.net.parameters(), fitter.net.parameters())
    )
    with pytest.raises(CheckpointError, match="other records"):
        PriorFitter(other, config).load_state(tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="other options"):
        PriorFitter(records, FitConfig(epochs=1, batch_size=50, lr=0.1)).load_state(tmp_path / "state.pt")


def test_an_unfinished_fit_is_not_overwritten(tmp_path):
    world = make_world()
    path = write_annotations(tmp_path / "a.json", world, *sample(world, 200, seed=5))
    records, _ = read_annotations(path, class_names(world))
    output = tmp_path / "prior.safetensors"
    state_path_for(output).write_bytes(b"an earlier run")
    with pytest.raises(HieraxError, match="--resume"):
        fit_prior(records, FitConfig(epochs=1, batch_size=50), output, progress=False)
