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
    answer_from_row(row, taxonomy=None) -> Answer: the same from one row of plain predict's output (typed values or
        CSV strings): its roll-up columns when it has them, else label_1 / prob_1 with the row's taxonomy columns.
        A sidecar written from the row then says what the table says.
    taxon_lineage(taxonomy, rank, name) -> tuple[str, ...]: kingdom .. name for a roll-up group.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
        allowed = np.asarray(allowed, dtype=np.int64)
        probs = restrict(probs, allowed)
        idx, vals = top_k(probs[:, allowed], min(k, len(allowed)))  # only allowed classes, even at probability 0
        idx = allowed[idx]
    else:
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


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def answer_from_row(row: Mapping[str, Any], taxonomy: Taxonomy | None = None) -> Answer:
    """What to call one row of plain predict's output (see the module docstring); `taxonomy` gives a roll-up
    group's lineage when the group is not an ancestor of the row's top species."""
    text = {key: "" if value is None else str(value) for key, value in row.items()}
    if "rollup_rank" in text:
        rank, name, probability = text["rollup_rank"], text.get("rollup_name", ""), _number(row.get("rollup_prob"))
        if not rank or not name:
            return Answer("", "", probability)
        common = text.get("common_name", "") if rank == "species" and name == text.get("species") else ""
        if rank in RANKS and text.get(rank) == name:
            lineage = tuple(text[r] for r in RANKS[: RANKS.index(rank) + 1])
        elif taxonomy is not None:
            lineage = taxon_lineage(taxonomy, rank, name)
        else:
            lineage = (name,)
        return Answer(name, rank, probability, common, lineage)
    probability, common = _number(row.get("prob_1")), text.get("common_name", "")
    if text.get("species"):
        return Answer(text["species"], "species", probability, common, tuple(text.get(r, "") for r in RANKS))
    label = text.get("label_1", "")
    return Answer(label, "", probability, common, (label,) if label else ())
