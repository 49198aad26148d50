"""The rows of a batch job's output: one flat dict per image, built from a BatchResult.

- predict (`PredictionRows`): probabilities -> probability steps -> the top k among the candidate classes ->
  taxonomy and common name of the best one -> roll-up.
- embed (`EmbeddingRows`): path, embedding and the pooled stage features asked for.

A probability step re-weights a batch's probabilities (B, C) from what the batch knows (its metadata,
embeddings, paths) before top-k and roll-up see them; steps run in order. The species list is one
(`SpeciesList`). Others fit the same slot: a location prior reading `BatchResult.meta`, or few-shot species
scored from `BatchResult.embeddings` and appended as extra columns (their names then extend the Taxonomy's
class names). Rows go to writers as plain dicts, so any output that takes rows (a sidecar writer, say) can take
these too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hierax.data.taxonomy import RANKS, Taxonomy, load_common_names, restrict, top_k
from hierax.inference.loading import BatchResult
from hierax.weights.files import ModelInfo

ProbabilityStep = Callable[[np.ndarray, BatchResult], np.ndarray]


@dataclass(frozen=True)
class SpeciesList:
    """A probability step: zero the classes outside `allowed` (class indices) and renormalise over the rest."""

    allowed: np.ndarray

    def __call__(self, probs: np.ndarray, result: BatchResult) -> np.ndarray:
        return restrict(probs, self.allowed)


class PredictionRows:
    """predict's rows: path, label_i/prob_i for the top k, the best label's taxonomy (iNat21 names) and common
    name (when names were given), and the roll-up. Only `candidates` (a species list; all classes when None)
    fill top-k slots, so k never exceeds their number and no excluded class shows up with probability 0."""

    def __init__(
        self,
        taxonomy: Taxonomy,
        *,
        top_k: int = 5,
        candidates: np.ndarray | None = None,
        steps: Sequence[ProbabilityStep] = (),
        rollup: bool = False,
        thresholds: Mapping[str, float] | None = None,
    ) -> None:
        self.taxonomy = taxonomy
        self.candidates = candidates
        self.k = min(top_k, len(taxonomy) if candidates is None else len(candidates))
        self.steps = list(steps)
        self.rollup = rollup
        self.thresholds = taxonomy.check_rollup(thresholds) if rollup else None

    @classmethod
    def for_model(
        cls,
        info: ModelInfo,
        *,
        top_k: int = 5,
        common_names: str | os.PathLike | None = None,
        species_list: str | os.PathLike | Sequence[str] | None = None,
        rollup: bool = False,
        thresholds: Mapping[str, float] | None = None,
    ) -> PredictionRows:
        """The rows for a model's classes. common_names: JSON index -> name, or an iNat21 annotation JSON.
        species_list: a file or a list of entries (class names, binomials, common names)."""
        names = load_common_names(common_names, info.class_names) if common_names else None
        taxonomy = Taxonomy(info.class_names, names)
        steps: list[ProbabilityStep] = []
        allowed = None
        if species_list is not None:
            if isinstance(species_list, str | os.PathLike):
                allowed = taxonomy.read_species_list(species_list)
            else:
                allowed = taxonomy.resolve_species_list(species_list)
            steps.append(SpeciesList(allowed))
        return cls(taxonomy, top_k=top_k, candidates=allowed, steps=steps, rollup=rollup, thresholds=thresholds)

    @property
    def columns(self) -> list[str]:
        columns = ["path"]
        for i in range(1, self.k + 1):
            columns += [f"label_{i}", f"prob_{i}"]
        if self.taxonomy.is_taxonomic:
            columns += list(RANKS)
        if self.taxonomy.common_names:
            columns.append("common_name")
        if self.rollup:
            columns += ["rollup_rank", "rollup_name", "rollup_prob"]
        return columns

    def probabilities(self, result: BatchResult) -> np.ndarray:
        """The batch's probabilities after every step."""
        probs = result.probs
        for step in self.steps:
            probs = step(probs, result)
        return probs

    def __call__(self, result: BatchResult) -> list[dict]:
        return self.rows(result.paths, self.probabilities(result))

    def _top(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.candidates is None:
            return top_k(probs, self.k)
        idx, vals = top_k(np.atleast_2d(probs)[:, self.candidates], self.k)
        return self.candidates[idx], vals

    def rows(self, paths: Sequence[str], probs: np.ndarray) -> list[dict]:
        """One row per path from final probabilities (B, C)."""
        idx, vals = self._top(probs)
        rolled = self.taxonomy.rollup(probs, self.thresholds) if self.rollup else None
        rows = []
        for r, path in enumerate(paths):
            row: dict = {"path": path}
            for j in range(idx.shape[1]):
                row[f"label_{j + 1}"] = self.taxonomy.class_names[idx[r, j]]
                row[f"prob_{j + 1}"] = round(float(vals[r, j]), 6)
            best = int(idx[r, 0])
            taxon = self.taxonomy.taxon(best)
            if taxon is not None and self.taxonomy.is_taxonomic:
                row.update(taxon.as_dict())
            if self.taxonomy.common_names:
                row["common_name"] = self.taxonomy.common_name(best)
            if rolled is not None:
                row.update(rollup_rank=rolled[r].rank, rollup_name=rolled[r].name)
                row["rollup_prob"] = round(rolled[r].probability, 6)
            rows.append(row)
        return rows


class EmbeddingRows:
    """embed's rows: path, embedding (float32) and one pooled feature vector per stage asked for."""

    def __init__(self, features: Sequence[str] = ()) -> None:
        self.features = list(features)

    @property
    def columns(self) -> list[str]:
        return ["path", "embedding", *self.features]

    def __call__(self, result: BatchResult) -> list[dict]:
        rows = []
        for i, path in enumerate(result.paths):
            row = {"path": path, "embedding": result.embeddings[i]}
            row.update({name: result.features[name][i] for name in self.features})
            rows.append(row)
        return rows
