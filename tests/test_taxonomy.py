"""Taxonomy: parsing iNat21 names, common names, roll-up thresholds, species lists and renormalisation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hierax.data.taxonomy import Rollup, Taxonomy, load_common_names, parse_class_name, restrict, rollup, top_k
from hierax.errors import HieraxError
from tests.data_fixtures import CLASS_NAMES, COMMON_NAMES, make_inat_dataset

OAKS = [
    "00010_Plantae_Tracheophyta_Magnoliopsida_Fagales_Fagaceae_Quercus_alba",
    "00011_Plantae_Tracheophyta_Magnoliopsida_Fagales_Fagaceae_Quercus_robur",
    "00012_Plantae_Tracheophyta_Magnoliopsida_Fagales_Fagaceae_Quercus_rubra",
    "00013_Plantae_Tracheophyta_Magnoliopsida_Fagales_Fagaceae_Fagus_sylvatica",
    "00014_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax",
]


def test_parse():
    taxon = parse_class_name("00123_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax")
    assert taxon.id == 123 and taxon.species == "Corvus corax" and taxon.at("class") == "Aves"
    assert taxon.as_dict()["family"] == "Corvidae"
    assert parse_class_name("00001_Plantae_A_B_C_D_Genus_novae-angliae").epithet == "novae-angliae"
    assert parse_class_name("golden retriever") is None
    assert parse_class_name("12_a_b_c") is None
    assert not Taxonomy(["cat", "dog"]).is_taxonomic


def test_rollup_deepest_passing_rank():
    tax = Taxonomy(OAKS, {4: "Common Raven"})
    probs = np.array(
        [
            [0.30, 0.35, 0.26, 0.05, 0.04],  # no oak is sure, the genus is: Quercus 0.91
            [0.02, 0.90, 0.03, 0.03, 0.02],  # species
            [0.20, 0.15, 0.10, 0.20, 0.35],  # Fagaceae 0.65 at family
            [0.15, 0.10, 0.10, 0.20, 0.45],  # Fagaceae 0.55
            [0.0, 0.0, 0.0, 0.0, 1.0],
        ]
    )
    got = tax.rollup(probs)
    assert (got[0].rank, got[0].name) == ("genus", "Quercus") and got[0].probability == pytest.approx(0.91)
    assert (got[1].rank, got[1].name, got[1].common_name) == ("species", "Quercus robur", "")
    assert (got[2].rank, got[2].name) == ("family", "Fagaceae") and got[2].probability == pytest.approx(0.65)
    assert (got[3].rank, got[3].name) == ("family", "Fagaceae")
    assert tax.rollup(probs[3], {"species": 0.9, "genus": 0.9, "family": 0.9}) == [Rollup("", "", 0.0)]
    assert got[4] == Rollup("species", "Corvus corax", 1.0, "Common Raven")
    assert rollup(probs[0], OAKS) == [got[0]]
    relaxed = tax.rollup(probs[3], {"species": 0.4, "kingdom": 0.5})
    assert (relaxed[0].rank, relaxed[0].name) == ("species", "Corvus corax")
    assert tax.rollup(probs[3], {"species": 0.5, "kingdom": 0.5})[0].name == "Plantae"
    with pytest.raises(HieraxError, match="unknown rank"):
        tax.rollup(probs, {"tribe": 0.5})
    with pytest.raises(HieraxError, match="iNat21-style"):
        Taxonomy(["cat", "dog"]).rollup(np.array([0.5, 0.5]))


def test_rank_sums_and_group_ids():
    tax = Taxonomy(OAKS)
    probs = np.full(5, 0.2)
    sums, names = tax.rank_sums(probs, "genus")
    assert dict(zip(names, sums.round(6))) == {"Corvus": 0.2, "Fagus": 0.2, "Quercus": 0.6}
    ids = tax.group_of("genus")
    assert [names[i] for i in ids] == ["Quercus", "Quercus", "Quercus", "Fagus", "Corvus"]


def test_species_list_and_restrict(tmp_path):
    tax = Taxonomy(OAKS, {4: "Common Raven"})
    lst = tmp_path / "checklist.txt"
    lst.write_text("# my region\nQuercus robur\nquercus_alba\ncommon raven\nUnicornus magicus\n")
    allowed = tax.read_species_list(lst)
    assert allowed.tolist() == [0, 1, 4]
    probs = np.array([[0.1, 0.2, 0.5, 0.1, 0.1]], dtype=np.float32)
    out = restrict(probs, allowed)
    np.testing.assert_allclose(out, [[0.25, 0.5, 0.0, 0.0, 0.25]], rtol=1e-6)
    np.testing.assert_allclose(restrict(np.zeros((1, 5)), allowed).sum(), 1.0)
    assert tax.resolve_species_list([OAKS[3], "2"]).tolist() == [2, 3]
    with pytest.raises(HieraxError, match="no entry"):
        tax.resolve_species_list(["Unicornus magicus"])


def test_common_names_from_both_formats(tmp_path):
    json_path = make_inat_dataset(tmp_path, per_class=1)
    assert load_common_names(json_path, CLASS_NAMES) == dict(enumerate(COMMON_NAMES))
    (tmp_path / "map.json").write_text(json.dumps({"0": "Raven", "3": "Oak"}))
    assert load_common_names(tmp_path / "map.json", CLASS_NAMES) == {0: "Raven", 3: "Oak"}
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(HieraxError):
        load_common_names(tmp_path / "bad.json", CLASS_NAMES)


def test_top_k():
    idx, val = top_k(np.array([[0.1, 0.5, 0.15, 0.25]]), 3)
    assert idx.tolist() == [[1, 3, 2]] and val.tolist() == [[0.5, 0.25, 0.15]]
    assert top_k(np.array([0.6, 0.4]), 5)[0].tolist() == [[0, 1]]
