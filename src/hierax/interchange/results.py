"""One classified detection (or photo) as plain values, and the answer hierax reports for it.

API:
    Classification(indices, probs, rollup=None): the top-k class indices and probabilities, best first (after the
        species list), and the taxonomic roll-up when asked for.
    classify(probs, taxonomy, *, k=5, allowed=None, rollup=False, thresholds=None) -> list[Classification]
        From a (N, C) probability batch such as `BatchResult.probs`: the species list (`restrict`), top-k and
        roll-up exactly as plain predict's rows make them.
    Answer(name, rank, probability, common_name, lineage): what to call it. With a roll-up, the deepest rank whose
        summed probability passed its threshold (rank '' and name '' when none did: an unidentified animal);
        without one, the top class (rank 'species' for iNat21 names, '' for other class names).
        `lineage` runs from the kingdom down to `name` (just (name,) for non-taxonomic classes).
    answer(classification, taxonomy) -> Answer
    taxon_lineage(taxonomy, rank, name) -> tuple[str, ...]: kingdom .. name for a roll-up group.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from hierax.data.taxonomy import RANKS, Rollup, Taxonomy, restrict, top_k


@dataclass(frozen=True)
class Classification:
    """Top-k class indices and probabilities (best first) of one crop or photo, with its roll-up if any."""

    indices: tuple[int, ...]
    probs: tuple[float, ...]
    rollup: Rollup | None = None

    @property
    def top(self) -> int:
        return self.indices[0]


@dataclass(frozen=True)
class Answer:
    """The name hierax gives a classification, its rank and probability, and its lineage for keywords."""

    name: str
    rank: str
    probability: float
    common_name: str = ""
    lineage: tuple[str, ...] = ()

    @property
    def identified(self) -> bool:
        return bool(self.name)


def classify(
    probs: np.ndarray,
    taxonomy: Taxonomy,
    *,
    k: int = 5,
    allowed: np.ndarray | None = None,
    rollup: bool = False,
    thresholds: Mapping[str, float] | None = None,
) -> list[Classification]:
    """Classifications of a (N, C) probability batch: species list, top-k and roll-up as plain predict does."""
    probs = np.atleast_2d(np.asarray(probs, dtype=np.float32))
    if allowed is not None:
        probs = restrict(probs, allowed)
    idx, vals = top_k(probs, min(k, probs.shape[1]))
    rolled = taxonomy.rollup(probs, thresholds) if rollup else [None] * len(probs)
    return [
        Classification(tuple(int(i) for i in idx[r]), tuple(float(v) for v in vals[r]), rolled[r])
        for r in range(len(probs))
    ]


@functools.lru_cache(maxsize=4096)
def taxon_lineage(taxonomy: Taxonomy, rank: str, name: str) -> tuple[str, ...]:
    """Names from the kingdom down to the group `name` at `rank` (the first class in it gives the lineage)."""
    if not taxonomy.is_taxonomic or rank not in RANKS:
        return (name,) if name else ()
    for taxon in taxonomy.taxa:
        if taxon is not None and taxon.at(rank) == name:
            return tuple(taxon.at(r) for r in RANKS[: RANKS.index(rank) + 1])
    return (name,)


def answer(classification: Classification, taxonomy: Taxonomy) -> Answer:
    """What to call a classification (see the module docstring)."""
    rolled = classification.rollup
    if rolled is not None:
        if not rolled.rank:
            return Answer("", "", rolled.probability)
        common = rolled.common_name
        return Answer(
            rolled.name, rolled.rank, rolled.probability, common, taxon_lineage(taxonomy, rolled.rank, rolled.name)
        )
    best = classification.top
    taxon = taxonomy.taxon(best) if taxonomy.is_taxonomic else None
    common = taxonomy.common_name(best)
    if taxon is None:
        name = taxonomy.class_names[best]
        return Answer(name, "", classification.probs[0], common, (name,))
    lineage = tuple(taxon.at(r) for r in RANKS)
    return Answer(taxon.species, "species", classification.probs[0], common, lineage)
