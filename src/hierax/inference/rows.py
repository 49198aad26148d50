"""The rows of a batch job's output: one flat dict per image, built from a BatchResult.

- predict (`PredictionRows`): probabilities -> probability steps -> (species of the user's own join the
  ranking) -> the top k among the candidates -> taxonomy and common name of the best one -> "unknown" for a low
  best score -> roll-up -> where and when.
- embed (`EmbeddingRows`): path, embedding and the pooled stage features asked for.

A probability step re-weights a batch's probabilities (B, C) over the model's classes from what the batch knows
(its metadata, embeddings, paths) before anything else sees them; steps run in order: the species list
(`SpeciesList`), then the location prior (`hierax.inference.place.GeoStep`). Both re-weight and renormalise, so
their order does not change the result. Species of the user's own come after the steps, through an
`OpenSetRule` (hierax.similar.openset.OpenSet): they are scored from the embeddings and share one ranked list
with the model's classes, so the prior re-weights the model's classes and leaves the user's species, which have
no range, as they are. Rows go to writers as plain dicts, so any output that takes rows (a sidecar writer, say)
can take these too.

Columns, fixed for a run by its options (so --resume and merged shards always agree):
    path, label_i, prob_i (i = 1..k) [, origin_i: "model" or "extra", with extra species]
    the best label's kingdom ... species (iNat21 model classes; empty when the best label is an extra species)
    common_name (with common names), prediction (with an unknown threshold: label_1, or "unknown")
    rollup_rank, rollup_name, rollup_prob (with --rollup), extra_species_prob (with extra species: the
    calibrated probability that the photo shows one of them), and PLACE_COLUMNS (with a location prior).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from hierax.data.taxonomy import RANKS, Rollup, Taxonomy, load_common_names, restrict, top_k
from hierax.inference.loading import BatchResult
from hierax.inference.place import PLACE_COLUMNS, capture_of, place_values
from hierax.weights.files import ModelInfo

ProbabilityStep = Callable[[np.ndarray, BatchResult], np.ndarray]


@dataclass(frozen=True)
class SpeciesList:
    """A probability step: zero the classes outside `allowed` (class indices) and renormalise over the rest."""

    allowed: np.ndarray

    def __call__(self, probs: np.ndarray, result: BatchResult) -> np.ndarray:
        return restrict(probs, self.allowed)


class Ranked(Protocol):
    """One ranked list of names per batch (hierax.similar.openset.RankedScores): probs (B, M) over `names`,
    `is_extra` (M,), `extra_mass` (B,) and the model's part `model_probs` (B, C) or None."""

    probs: np.ndarray
    names: list[str]
    is_extra: np.ndarray
    extra_mass: np.ndarray
    model_probs: np.ndarray | None


class OpenSetRule(Protocol):
    """Species of the user's own and "unknown", as predict needs them. hierax.similar.openset.OpenSet implements
    it; predict takes it as a value because hierax.similar is built on predict (its index embeds through it)."""

    extra_names: list[str]
    only_extra: bool
    threshold: float | None
    unknown_label: str

    @property
    def needs_embeddings(self) -> bool: ...

    def check_model(self, model: Any, net: Any, info: ModelInfo, *, tta: bool) -> None: ...

    def rank(self, probs: np.ndarray, embeddings: np.ndarray | None, model_names: list[str]) -> Ranked: ...

    def unknown(self, best: np.ndarray) -> np.ndarray: ...

    def rollup(self, taxonomy: Taxonomy, ranked: Ranked, thresholds: Mapping[str, float] | None) -> list[Rollup]: ...


class PredictionRows:
    """predict's rows (see the module docstring). Only `candidates` (a species list; all classes when None) and
    the user's species fill top-k slots, so k never exceeds their number and no excluded class shows up with
    probability 0."""

    def __init__(
        self,
        taxonomy: Taxonomy,
        *,
        top_k: int = 5,
        candidates: np.ndarray | None = None,
        steps: Sequence[ProbabilityStep] = (),
        rollup: bool = False,
        thresholds: Mapping[str, float] | None = None,
        open_set: OpenSetRule | None = None,
        place: bool = False,
    ) -> None:
        self.taxonomy = taxonomy
        self.open_set = open_set
        self.extra = list(open_set.extra_names) if open_set is not None else []
        self.only_extra = bool(open_set is not None and open_set.only_extra)
        self.candidates = self._candidates(candidates)
        if self.only_extra:
            ranked = len(self.extra)
        else:
            ranked = len(taxonomy) + len(self.extra) if self.candidates is None else len(self.candidates)
        self.k = min(top_k, ranked)
        self.steps = list(steps)
        self.rollup = rollup
        self.thresholds = taxonomy.check_rollup(thresholds) if rollup else None
        self.place = place  # a location prior runs among the steps: PLACE_COLUMNS

    def _candidates(self, allowed: np.ndarray | None) -> np.ndarray | None:
        """Indices into the ranked list that may fill top-k slots: the allowed model classes and every extra."""
        if allowed is None or self.only_extra:
            return None
        extra = len(self.taxonomy) + np.arange(len(self.extra), dtype=np.int64)
        return np.concatenate([np.asarray(allowed, dtype=np.int64), extra])

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
        geo_step: ProbabilityStep | None = None,
        open_set: OpenSetRule | None = None,
    ) -> PredictionRows:
        """The rows for a model's classes. common_names: JSON index -> name, or an iNat21 annotation JSON.
        species_list: a file or a list of entries (class names, binomials, common names). geo_step: a location
        prior's step (GeoStep), run after the species list; it adds the PLACE_COLUMNS."""
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
        if geo_step is not None:
            steps.append(geo_step)
        return cls(
            taxonomy,
            top_k=top_k,
            candidates=allowed,
            steps=steps,
            rollup=rollup,
            thresholds=thresholds,
            open_set=open_set,
            place=geo_step is not None,
        )

    @property
    def predicts(self) -> bool:
        """Whether rows get a `prediction` column (an unknown threshold is set)."""
        return self.open_set is not None and self.open_set.threshold is not None

    @property
    def columns(self) -> list[str]:
        columns = ["path"]
        for i in range(1, self.k + 1):
            columns += [f"label_{i}", f"prob_{i}"] + ([f"origin_{i}"] if self.extra else [])
        if self.taxonomy.is_taxonomic and not self.only_extra:
            columns += list(RANKS)
        if self.taxonomy.common_names and not self.only_extra:
            columns.append("common_name")
        if self.predicts:
            columns.append("prediction")
        if self.rollup:
            columns += ["rollup_rank", "rollup_name", "rollup_prob"]
        if self.extra:
            columns.append("extra_species_prob")
        if self.place:
            columns += PLACE_COLUMNS
        return columns

    def probabilities(self, result: BatchResult) -> np.ndarray:
        """The batch's probabilities over the model's classes after every step."""
        probs = result.probs
        for step in self.steps:
            probs = step(probs, result)
        return probs

    def __call__(self, result: BatchResult) -> list[dict]:
        probs = self.probabilities(result)
        ranked = None
        if self.open_set is not None:
            ranked = self.open_set.rank(probs, result.embeddings, self.taxonomy.class_names)
        return self.rows(result.paths, probs, ranked, result.meta)

    def _top(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.candidates is None:
            return top_k(probs, self.k)
        idx, vals = top_k(np.atleast_2d(probs)[:, self.candidates], self.k)
        return self.candidates[idx], vals

    def _rolled(self, probs: np.ndarray, ranked: Ranked | None) -> list[Rollup] | None:
        if not self.rollup:
            return None
        if self.open_set is not None and ranked is not None:
            return self.open_set.rollup(self.taxonomy, ranked, self.thresholds)
        return self.taxonomy.rollup(probs, self.thresholds)

    def _best_class(self, row: dict, best: int) -> None:
        """The taxonomy and common name of a model class, or blanks for one of the user's species."""
        own = best < len(self.taxonomy) and not self.only_extra
        if self.taxonomy.is_taxonomic and not self.only_extra:
            taxon = self.taxonomy.taxon(best) if own else None
            row.update(taxon.as_dict() if taxon is not None else dict.fromkeys(RANKS, ""))
        if self.taxonomy.common_names and not self.only_extra:
            row["common_name"] = self.taxonomy.common_name(best) if own else ""

    def rows(
        self,
        paths: Sequence[str],
        probs: np.ndarray,
        ranked: Ranked | None = None,
        meta: Sequence[Mapping] | None = None,
    ) -> list[dict]:
        """One row per path from final probabilities (B, C), the ranked list with the user's species (when
        there is an open-set rule) and the per-image metadata (for the place columns)."""
        scores = probs if ranked is None else ranked.probs
        names = self.taxonomy.class_names if ranked is None else ranked.names
        is_extra = np.zeros(len(names), bool) if ranked is None else ranked.is_extra
        idx, vals = self._top(scores)
        rolled = self._rolled(probs, ranked)
        unknown = self.open_set.unknown(vals[:, 0]) if self.predicts else None
        rows = []
        for r, path in enumerate(paths):
            row: dict = {"path": path}
            for j in range(idx.shape[1]):
                row[f"label_{j + 1}"] = names[idx[r, j]]
                row[f"prob_{j + 1}"] = round(float(vals[r, j]), 6)
                if self.extra:
                    row[f"origin_{j + 1}"] = "extra" if is_extra[idx[r, j]] else "model"
            self._best_class(row, int(idx[r, 0]))
            if unknown is not None:
                row["prediction"] = self.open_set.unknown_label if unknown[r] else row["label_1"]
            if rolled is not None:
                row.update(rollup_rank=rolled[r].rank, rollup_name=rolled[r].name)
                row["rollup_prob"] = round(rolled[r].probability, 6)
            if self.extra:
                row["extra_species_prob"] = round(float(ranked.extra_mass[r]), 6)
            if self.place:
                context = capture_of(meta[r] if meta is not None else {})
                row.update(place_values(context, prior_applied=context.has_location))
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
