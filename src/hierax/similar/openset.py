"""One ranked list from the model's classes and the user's few-shot species, and "unknown" for a low best score.

Making the two scales comparable: both become probabilities over one partition of what a photo can show.
- The few-shot file gives m = P(the photo shows one of the user's species), calibrated on leave-one-out, and
  splits m among the user's species in proportion to their one-vs-rest probabilities (hierax.similar.fewshot).
- The model's classes share the rest, 1 - m, in the model's own proportions: p'_c = (1 - m) p_c.
So each row sums to 1, the model's order among its own classes never changes, a photo like the references
(m near 1) pushes the model's classes down, and one unlike them (m near 0) leaves the model's probabilities
nearly as they were. With only_extra the list holds the user's species alone; 1 - m is then "none of them".

Open set: a row whose best probability is below the threshold is "unknown" (`decide`); `open_set_rollup`
applies the same rule to a taxonomic roll-up, so predict, the service and the roll-up agree. `OpenSet` bundles
these rules for `hierax predict` (hierax.inference.rows.OpenSetRule), which takes it as a value: this package
embeds through predict, so predict cannot import it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hierax.data.taxonomy import Rollup, Taxonomy, top_k
from hierax.errors import HieraxError
from hierax.similar.fewshot import ExtraSpecies
from hierax.similar.identity import ModelIdentity
from hierax.weights.files import ModelInfo

UNKNOWN = "unknown"


@dataclass
class RankedScores:
    """Probabilities over `names` (N, M); `is_extra` marks the user's species; `model_probs` is the model's
    part after sharing (N, C), or None with only_extra; `extra_mass` is m per row."""

    probs: np.ndarray
    names: list[str]
    is_extra: np.ndarray
    extra_mass: np.ndarray
    model_probs: np.ndarray | None

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices into names, probabilities), (N, k), best first."""
        return top_k(self.probs, min(k, len(self.names)))

    def best(self) -> tuple[np.ndarray, np.ndarray]:
        """(index, probability) of each row's best entry."""
        idx = self.probs.argmax(axis=1)
        return idx, self.probs[np.arange(len(idx)), idx]


def combine_scores(
    model_probs: np.ndarray | None,
    embeddings: np.ndarray,
    extra: ExtraSpecies,
    model_names: list[str] | None = None,
    *,
    only_extra: bool = False,
) -> RankedScores:
    """The model's (N, C) probabilities and the user's species scored on the (N, D) embeddings, as one ranked
    list (see the module docstring). model_names: the model's class names (ModelInfo.class_names)."""
    shares = extra.probabilities(embeddings).astype(np.float64)
    mass = np.clip(shares.sum(axis=1), 0.0, 1.0)
    if only_extra:
        names = list(extra.class_names)
        return RankedScores(shares.astype(np.float32), names, np.ones(len(extra), bool), mass.astype(np.float32), None)
    if model_probs is None or model_names is None:
        raise HieraxError("combining with the model's classes needs its probabilities and class names")
    model_probs = np.atleast_2d(np.asarray(model_probs, dtype=np.float64))
    if model_probs.shape[0] != shares.shape[0] or model_probs.shape[1] != len(model_names):
        raise HieraxError(f"{model_probs.shape} model probabilities for {shares.shape[0]} embeddings")
    clash = set(model_names) & set(extra.class_names)
    if clash:
        raise HieraxError(f"user species named like model classes: {', '.join(sorted(clash)[:5])}; rename them")
    shared = model_probs * (1.0 - mass)[:, None]
    probs = np.concatenate([shared, shares], axis=1).astype(np.float32)
    is_extra = np.concatenate([np.zeros(len(model_names), bool), np.ones(len(extra), bool)])
    return RankedScores(probs, [*model_names, *extra.class_names], is_extra, mass.astype(np.float32), shared)


def unknown_mask(best_probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """True where the best probability is below `threshold` (none is unknown when threshold is None)."""
    best = np.asarray(best_probs, dtype=np.float64)
    if threshold is None:
        return np.zeros(best.shape, bool)
    if not 0.0 <= threshold <= 1.0:
        raise HieraxError(f"an unknown threshold is a probability in [0, 1], not {threshold}")
    return best < threshold


def decide(probs: np.ndarray, names: list[str], threshold: float | None) -> list[str]:
    """Each row's best name, or UNKNOWN when its probability is below `threshold`."""
    probs = np.atleast_2d(probs)
    idx = probs.argmax(axis=1)
    unknown = unknown_mask(probs[np.arange(len(idx)), idx], threshold)
    return [UNKNOWN if u else names[i] for i, u in zip(idx, unknown)]


def open_set_rollup(
    taxonomy: Taxonomy,
    scores: RankedScores | np.ndarray,
    thresholds: Mapping[str, float] | None = None,
    unknown_threshold: float | None = None,
) -> list[Rollup]:
    """Taxonomic roll-up with the user's species and the open-set rule: a user species whose probability
    passes the species threshold is the answer (rank 'species'); otherwise the model's part is rolled up
    (its mass already reduced by the user's species); a result below `unknown_threshold`, or none at all,
    becomes Rollup('', UNKNOWN, p). `scores` may also be plain model probabilities (N, C)."""
    thresholds = taxonomy.check_rollup(thresholds)
    if isinstance(scores, RankedScores):
        if scores.model_probs is None:
            raise HieraxError("roll-up needs the model's classes (not only_extra)")
        model_part, extra_probs = scores.model_probs, scores.probs[:, scores.is_extra]
        extra_names = [n for n, e in zip(scores.names, scores.is_extra) if e]
    else:
        model_part, extra_probs, extra_names = np.atleast_2d(scores), np.zeros((len(np.atleast_2d(scores)), 0)), []
    rolled = taxonomy.rollup(model_part, thresholds)
    species_bar = thresholds.get("species", 1.0)
    out = []
    for row, result in enumerate(rolled):
        if extra_names:
            e = int(extra_probs[row].argmax())
            p = float(extra_probs[row, e])
            if p >= species_bar and p >= result.probability:
                result = Rollup("species", extra_names[e], p)
        floor = 0.0 if unknown_threshold is None else unknown_threshold
        if not result.rank or result.probability < floor:
            result = Rollup("", UNKNOWN, result.probability)
        out.append(result)
    return out


@dataclass
class OpenSet:
    """The user's few-shot species in predict's ranking and "unknown" for a low best score. `extra`: the species
    (None: the model's classes alone, with `threshold` as the floor of a believable answer); `only_extra`: rank
    the user's species alone; `threshold`: None takes the species file's calibrated one."""

    extra: ExtraSpecies | None = None
    only_extra: bool = False
    threshold: float | None = None
    unknown_label: str = UNKNOWN

    def __post_init__(self) -> None:
        if self.only_extra and self.extra is None:
            raise HieraxError("--only-extra ranks the species of --extra-species alone: give --extra-species FILE")
        if self.threshold is None and self.extra is not None:
            self.threshold = float(self.extra.unknown_threshold)
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise HieraxError(f"the unknown threshold is a probability in [0, 1], not {self.threshold}")

    @classmethod
    def load(
        cls, path: str | os.PathLike | None = None, *, only_extra: bool = False, threshold: float | None = None
    ) -> OpenSet:
        """From a few-shot species file (`hierax fewshot fit`), or none; HieraxError for a file that is not one."""
        return cls(ExtraSpecies.load(path) if path is not None else None, only_extra, threshold)

    @property
    def extra_names(self) -> list[str]:
        return list(self.extra.class_names) if self.extra is not None else []

    @property
    def needs_embeddings(self) -> bool:
        return self.extra is not None

    def check_model(self, model: Any, net: Any, info: ModelInfo, *, tta: bool) -> None:
        """ModelMismatchError unless this model (at this size and tta) made the species' embeddings; HieraxError
        when a user species is named like one of the model's classes. Run before any image is read."""
        if self.extra is None:
            return
        self.extra.check_model(ModelIdentity.of(model, net, info, tta=tta))
        clash = sorted(set(info.class_names) & set(self.extra.class_names))
        if clash and not self.only_extra:
            raise HieraxError(f"user species named like model classes: {', '.join(clash[:5])}; rename them")

    def rank(self, probs: np.ndarray, embeddings: np.ndarray | None, model_names: list[str]) -> RankedScores:
        """One batch's ranked list (combine_scores), or the model's classes alone when there are no user species."""
        if self.extra is None:
            rows = len(probs)
            return RankedScores(probs, list(model_names), np.zeros(len(model_names), bool), np.zeros(rows), probs)
        if embeddings is None:
            raise HieraxError("the user's species are scored on embeddings: run the model with return_embedding")
        return combine_scores(probs, embeddings, self.extra, model_names, only_extra=self.only_extra)

    def unknown(self, best: np.ndarray) -> np.ndarray:
        """True where a row's best probability is below the threshold."""
        return unknown_mask(best, self.threshold)

    def rollup(self, taxonomy: Taxonomy, ranked: RankedScores, thresholds: Mapping[str, float] | None) -> list[Rollup]:
        """open_set_rollup with this threshold."""
        return open_set_rollup(taxonomy, ranked, thresholds, self.threshold)
