"""hierax.similar.openset on controlled scores: one list that sums to 1 and keeps the model's order, the user's
species taking their calibrated mass, only_extra, "unknown" and the open-set roll-up."""

from __future__ import annotations

import numpy as np
import pytest

from hierax.data.taxonomy import Taxonomy
from hierax.errors import HieraxError
from hierax.similar import UNKNOWN, combine_scores, decide, fit_prototypes, open_set_rollup, unknown_mask
from hierax.similar.identity import ModelIdentity
from tests.conftest import inat_names

IDENTITY = ModelIdentity("synthetic", "none", 0, 16, (64, 64), False, "0" * 64)


@pytest.fixture(scope="module")
def extra():
    """Two user species around two directions of a 16-d space, five references each, and a background of photos
    around the other directions."""
    rng = np.random.default_rng(0)
    centres = np.eye(16)[:2] * 4 + 1.0
    refs = np.repeat(centres, 5, axis=0) + 0.3 * rng.standard_normal((10, 16))
    background = np.eye(16)[rng.integers(2, 16, 60)] * 4 + 1.0 + 0.3 * rng.standard_normal((60, 16))
    species = fit_prototypes(
        refs.astype(np.float32), np.repeat([0, 1], 5), ["mine_a", "mine_b"], IDENTITY, background=background
    )
    return species, centres


def test_one_list_sums_to_one_and_lets_each_side_win_where_it_knows(extra):
    species, centres = extra
    rng = np.random.default_rng(1)
    like_mine = (centres[[0, 1]] + 0.3 * rng.standard_normal((2, 16))).astype(np.float32)
    elsewhere = (np.eye(16)[[5, 9]] * 4 + 1.0 + 0.3 * rng.standard_normal((2, 16))).astype(np.float32)
    model = np.array([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8]])
    ranked = combine_scores(model, np.concatenate([like_mine, elsewhere]), species, ["m0", "m1", "m2"])
    assert ranked.names == ["m0", "m1", "m2", "mine_a", "mine_b"] and ranked.is_extra.tolist() == [0, 0, 0, 1, 1]
    np.testing.assert_allclose(ranked.probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ranked.probs[:, 3:].sum(axis=1), ranked.extra_mass, atol=1e-6)
    np.testing.assert_allclose(ranked.probs[:, :3], model * (1 - ranked.extra_mass[:, None]), atol=1e-6)
    assert [ranked.names[i] for i in ranked.probs.argmax(axis=1)] == ["mine_a", "mine_b", "m0", "m2"]
    assert ranked.extra_mass[:2].min() > 0.8 and ranked.extra_mass[2:].max() < 0.2
    idx, vals = ranked.top_k(3)
    assert idx.shape == (4, 3) and (np.diff(vals, axis=1) <= 0).all()


def test_only_extra_leaves_the_rest_as_none_of_them(extra):
    species, centres = extra
    ranked = combine_scores(None, centres.astype(np.float32), species, only_extra=True)
    assert ranked.names == ["mine_a", "mine_b"] and ranked.model_probs is None
    assert ranked.probs.argmax(axis=1).tolist() == [0, 1] and (ranked.probs.sum(axis=1) <= 1.0 + 1e-6).all()


def test_bad_inputs_are_refused(extra):
    species, centres = extra
    with pytest.raises(HieraxError, match="named like model classes"):
        combine_scores(np.full((1, 2), 0.5), centres[:1].astype(np.float32), species, ["mine_a", "x"])
    with pytest.raises(HieraxError, match="needs its probabilities"):
        combine_scores(None, centres[:1].astype(np.float32), species)
    with pytest.raises(HieraxError, match=r"probability in \[0, 1\]"):
        unknown_mask(np.array([0.5]), 1.5)


def test_a_low_best_score_is_unknown():
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.05, 0.9, 0.05]])
    assert decide(probs, ["a", "b", "c"], 0.5) == ["a", UNKNOWN, "b"]
    assert decide(probs, ["a", "b", "c"], None) == ["a", "a", "b"]
    assert unknown_mask(np.array([0.49, 0.5]), 0.5).tolist() == [True, False]


def test_open_set_rollup_takes_user_species_and_calls_the_rest_unknown(extra):
    species, centres = extra
    names = inat_names(4)  # species0/1 in one genus, species2/3 in another
    taxonomy = Taxonomy(names)
    model = np.array([[0.45, 0.45, 0.05, 0.05], [0.3, 0.2, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]])
    rng = np.random.default_rng(3)
    far = (np.eye(16)[[7, 8, 11]] * 4 + 1.0 + 0.3 * rng.standard_normal((3, 16))).astype(np.float32)
    ranked = combine_scores(model, far, species, names)
    rolled = open_set_rollup(taxonomy, ranked, {"species": 0.8, "genus": 0.6}, unknown_threshold=0.5)
    assert rolled[0].rank == "genus" and rolled[0].name == "Corvus"
    assert rolled[1].name == UNKNOWN and rolled[2].name == UNKNOWN
    mine = combine_scores(model[:1], centres[:1].astype(np.float32), species, names)
    best = open_set_rollup(taxonomy, mine, {"species": 0.8})[0]
    assert (best.rank, best.name) == ("species", "mine_a")
    plain = open_set_rollup(taxonomy, model, {"species": 0.8, "genus": 0.6}, unknown_threshold=0.95)
    assert [r.name for r in plain] == [UNKNOWN] * 3
