"""Species of the user's own, from a few reference photos each, without training: a prototype classifier on the
model's embeddings with calibrated probabilities and an open-set rule.

Method (SimpleShot's CL2N prototypes, then Platt scaling fitted on leave-one-out):
1. Embed every reference photo (the model's pre-logits embedding, as `hierax embed` writes it) and L2-normalise.
2. Centre: subtract a mean embedding `mu` (the mean of the references, or with a background set - photos of
   none of these species, e.g. an index of the user's own photos - the mean of those) and L2-normalise again:
   z = (u - mu) / |u - mu|.
3. Prototype of species c: the L2-normalised mean of its z. A photo's score for c is the cosine s_c = z . p_c.
4. Leave-one-out: each photo of a species with at least two photos is scored against its own prototype rebuilt
   without it, and against every other prototype; `mu` is kept (its change is 1/N).
5. Species rule: q_c = sigmoid(a s_c + b), P(the photo shows c), fitted one-vs-rest on those (photo, species)
   pairs by Newton's method with Platt's smoothed targets (separable references still give a finite slope).
6. Open-set rule: m = sigmoid(c s_best + d), P(the photo shows one of these species), fitted the same way on
   each left-out photo's best score (its species listed) against its best score among the other species (as if
   its own were missing from the list), one of each per photo, plus each background photo's best score as an
   unlisted example. Without a background the only unlisted examples are the other species, which after
   centring on the references sit on the far side of the mean, so photos unlike all of them can look listed:
   give a background where one is at hand.
7. A photo's probability for species c is m q_c / sum(q); they add up to m (see hierax.similar.openset for the
   list shared with the model's classes). Default unknown threshold: where the share of left-out photos of
   listed species below it equals the share of "unlisted" ones at or above it (equal error rate). Left-out
   prototypes hold one photo fewer than the final ones, so on new photos of known species the rule errs
   towards accepting them.

A species with a single photo keeps it as its prototype and serves as a negative for the others, but gives no
positive pair (a warning names it); fitting needs at least two species and one species with two photos.
The file (.safetensors) carries the class names, the model's ModelIdentity, the centring vector, prototypes,
both rules, the default unknown threshold and the leave-one-out figures.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from hierax.atomic import atomic_write
from hierax.data.datasets import load_labelled
from hierax.errors import HieraxError
from hierax.inference.loading import ModelSpec, resolve_model
from hierax.similar.identity import ModelIdentity
from hierax.similar.index import open_index
from hierax.similar.search import embed_images
from hierax.similar.vectors import normalise
from hierax.weights.catalog import DEFAULT_MODEL

logger = logging.getLogger(__name__)

FORMAT = "hierax-fewshot-1"
METHOD = "simpleshot-cl2n prototypes, leave-one-out logistic calibration"
BACKGROUND_MAX = 2000


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def fit_logistic(
    scores: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None, iterations: int = 100
) -> tuple[float, float]:
    """(a, b) of P(positive | score) = sigmoid(a * score + b), fitted by Newton's method on Platt's smoothed
    targets ((N+ + 1) / (N+ + 2) for positives, 1 / (N- + 2) for negatives), each pair counted `weights` times."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    w = np.ones(len(s)) if weights is None else np.asarray(weights, dtype=np.float64)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise HieraxError("calibration needs both matching and non-matching pairs")
    target = np.where(pos, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    features = np.stack([s, np.ones_like(s)], axis=1)
    params = np.array([0.0, np.log((w[pos].sum() + 1) / (w[~pos].sum() + 1))])

    def loss(p: np.ndarray) -> float:
        z = features @ p
        return float(np.sum(w * (np.logaddexp(0, z) - target * z)))

    for _ in range(iterations):
        prob = sigmoid(features @ params)
        grad = features.T @ (w * (prob - target))
        hess = (features * (w * prob * (1 - prob))[:, None]).T @ features + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t, current = 1.0, loss(params)
        while loss(params - t * step) > current and t > 1e-4:  # damped: never increase the loss
            t /= 2
        params = params - t * step
        if np.abs(t * step).max() < 1e-10:
            break
    return float(params[0]), float(params[1])


def equal_error_threshold(known: np.ndarray, unknown: np.ndarray) -> float:
    """The threshold where the share of `known` scores below it equals the share of `unknown` scores at or above
    it (the equal error rate): the midpoint of the widest interval where the two rates are closest."""
    known, unknown = np.asarray(known, np.float64), np.asarray(unknown, np.float64)
    values = np.unique(np.concatenate([known, unknown, [0.0, 1.0]]))
    cuts = (values[:-1] + values[1:]) / 2
    missed = (known[None, :] < cuts[:, None]).mean(axis=1)
    accepted = (unknown[None, :] >= cuts[:, None]).mean(axis=1) if len(unknown) else np.zeros(len(cuts))
    gap = np.abs(missed - accepted)
    best = np.flatnonzero(gap <= gap.min() + 1e-12)
    widths = values[best + 1] - values[best]
    return float(cuts[best[np.argmax(widths)]])


@dataclass(frozen=True)
class Rule:
    """A logistic rule on a cosine score: P = sigmoid(slope * score + intercept)."""

    slope: float
    intercept: float

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return sigmoid(self.slope * np.asarray(scores, dtype=np.float64) + self.intercept)

    @classmethod
    def fit(cls, scores: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None) -> Rule:
        return cls(*fit_logistic(scores, positive, weights))


@dataclass
class ExtraSpecies:
    """A fitted few-shot classifier (see the module docstring): `probabilities(embeddings)` -> (N, E)."""

    class_names: list[str]
    prototypes: np.ndarray
    centre: np.ndarray
    species_rule: Rule
    open_set_rule: Rule
    unknown_threshold: float
    model: ModelIdentity
    counts: list[int] = field(default_factory=list)
    loo: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.class_names)

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """L2-normalise, centre, L2-normalise (step 2)."""
        return normalise(normalise(embeddings) - self.centre[None, :])

    def similarities(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, E) cosine scores of embeddings against the prototypes."""
        return self.project(embeddings) @ self.prototypes.T

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, E) probabilities that each photo shows each species: m q_c / sum(q), adding up to m (step 7)."""
        return split_mass(self.similarities(embeddings), self.species_rule, self.open_set_rule).astype(np.float32)

    def check_model(self, other: ModelIdentity, what: str = "the few-shot species") -> None:
        """ModelMismatchError unless `other` makes the embeddings these species were fitted on."""
        self.model.check(other, what)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a .safetensors file (atomic)."""
        tensors = {"prototypes": self.prototypes.astype(np.float32), "centre": self.centre.astype(np.float32)}
        meta = {
            "format": FORMAT,
            "method": METHOD,
            "class_names": json.dumps(self.class_names),
            "model": json.dumps(self.model.to_dict()),
            "species_rule": json.dumps(asdict(self.species_rule)),
            "open_set_rule": json.dumps(asdict(self.open_set_rule)),
            "unknown_threshold": repr(self.unknown_threshold),
            "counts": json.dumps(self.counts),
            "leave_one_out": json.dumps(self.loo),
        }
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExtraSpecies:
        """Read a file written by save()."""
        try:
            with safe_open(str(path), framework="numpy") as handle:
                meta = handle.metadata() or {}
                prototypes, centre = handle.get_tensor("prototypes"), handle.get_tensor("centre")
        except (SafetensorError, OSError, ValueError) as err:
            raise HieraxError(f"cannot read the few-shot species file {path} ({err})") from None
        if meta.get("format") != FORMAT:
            raise HieraxError(f"{path} is not a hierax few-shot species file (format {meta.get('format')!r})")
        try:
            return cls(
                class_names=json.loads(meta["class_names"]),
                prototypes=prototypes,
                centre=centre,
                species_rule=Rule(**json.loads(meta["species_rule"])),
                open_set_rule=Rule(**json.loads(meta["open_set_rule"])),
                unknown_threshold=float(meta["unknown_threshold"]),
                model=ModelIdentity.from_dict(json.loads(meta["model"])),
                counts=json.loads(meta.get("counts", "[]")),
                loo=json.loads(meta.get("leave_one_out", "{}")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise HieraxError(f"{path}: the few-shot species file is damaged ({err!r})") from None


def split_mass(scores: np.ndarray, species_rule: Rule, open_set_rule: Rule, mask: np.ndarray | None = None):
    """Per-species probabilities m q_c / sum(q) from (N, E) cosine scores; entries outside `mask` get 0."""
    usable = np.ones(scores.shape, bool) if mask is None else mask
    q = np.where(usable, species_rule(scores), 0.0)
    best = np.where(usable, scores, -np.inf).max(axis=1)
    mass = open_set_rule(best)
    return q * (mass / np.maximum(q.sum(axis=1), 1e-12))[:, None]


def _leave_one_out(z: np.ndarray, labels: np.ndarray, counts: np.ndarray):
    """Prototypes, the (N, E) leave-one-out scores, which entries are a photo's own species (`own`) and which
    may be used at all (`usable`: not a singleton against itself), and the rows that have an own score."""
    sums = np.zeros((len(counts), z.shape[1]), np.float64)
    np.add.at(sums, labels, z)
    prototypes = normalise(sums)
    scores = z @ prototypes.T
    rows = np.flatnonzero(counts[labels] >= 2)
    scores[rows, labels[rows]] = np.sum(z[rows] * normalise(sums[labels[rows]] - z[rows]), axis=1)
    own = np.zeros(scores.shape, bool)
    own[rows, labels[rows]] = True
    usable = np.ones(scores.shape, bool)
    single = np.flatnonzero(counts[labels] < 2)
    usable[single, labels[single]] = False
    return prototypes, scores, own, usable, rows


def _calibrate(scores, own, usable, rows, labels, background_scores: np.ndarray | None):
    """Steps 5-7: the species rule, the open-set rule, the unknown threshold and the leave-one-out figures.
    `background_scores` (B, E): photos of none of the species, used as further unlisted examples."""
    species_rule = Rule.fit(scores[usable], own[usable])
    others = usable & ~own
    listed_best = np.where(usable, scores, -np.inf)[rows].max(axis=1)
    unlisted_best = np.where(others, scores, -np.inf).max(axis=1)
    unlisted_scores, unlisted_mask = scores, others
    if background_scores is not None and len(background_scores):
        unlisted_best = np.concatenate([unlisted_best, background_scores.max(axis=1)])
        unlisted_scores = np.concatenate([scores, background_scores])
        unlisted_mask = np.concatenate([others, np.ones(background_scores.shape, bool)])
    # listed and unlisted examples weigh the same in total: a prior of one half
    open_set_rule = Rule.fit(
        np.concatenate([listed_best, unlisted_best]),
        np.concatenate([np.ones(len(rows), bool), np.zeros(len(unlisted_best), bool)]),
        np.concatenate([np.ones(len(rows)), np.full(len(unlisted_best), len(rows) / len(unlisted_best))]),
    )
    listed = split_mass(scores[rows], species_rule, open_set_rule, usable[rows])[np.arange(len(rows)), labels[rows]]
    unlisted = split_mass(unlisted_scores, species_rule, open_set_rule, unlisted_mask).max(axis=1)
    threshold = float(np.clip(equal_error_threshold(listed, unlisted), 0.01, 0.99))
    correct = np.where(usable, scores, -np.inf)[rows].argmax(axis=1) == labels[rows]
    loo = {
        "accuracy": round(float(correct.mean()), 4),
        "photos": int(len(rows)),
        "known_called_unknown": round(float((listed < threshold).mean()), 4),
        "unknown_accepted": round(float((unlisted >= threshold).mean()), 4),
    }
    return species_rule, open_set_rule, threshold, loo


def fit_prototypes(
    embeddings: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    model: ModelIdentity,
    *,
    background: np.ndarray | None = None,
) -> ExtraSpecies:
    """Fit prototypes, both rules and the unknown threshold from (N, D) reference embeddings and their labels
    (indices into class_names). `background`: (B, D) embeddings of photos showing none of these species (e.g.
    an index of the user's other photos): the centring mean is theirs, and they count as unlisted examples."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=len(class_names))
    if len(class_names) < 2:
        raise HieraxError("few-shot needs at least two species (a second one is what tells a match from a miss)")
    if (counts == 0).any():
        raise HieraxError(f"no photo of {', '.join(class_names[c] for c in np.flatnonzero(counts == 0))}")
    if counts.max() < 2:
        raise HieraxError("few-shot needs two or more photos of at least one species for leave-one-out calibration")
    single = [class_names[c] for c in np.flatnonzero(counts == 1)]
    if single:
        logger.warning(
            "one photo only for %s: kept as the prototype, but not used to calibrate (add a second photo)",
            ", ".join(single),
        )
    units = normalise(embeddings)
    base = None if background is None or not len(background) else normalise(background)
    if base is not None and base.shape[1] != units.shape[1]:
        raise HieraxError(f"the background embeddings are {base.shape[1]}-d; the references are {units.shape[1]}-d")
    mu = units.mean(axis=0) if base is None else base.mean(axis=0)
    prototypes, scores, own, usable, rows = _leave_one_out(normalise(units - mu[None, :]), labels, counts)
    base_scores = None if base is None else normalise(base - mu[None, :]) @ prototypes.T
    species_rule, open_set_rule, threshold, loo = _calibrate(scores, own, usable, rows, labels, base_scores)
    logger.info("few-shot leave-one-out: %s; unknown threshold %.3f", loo, threshold)
    return ExtraSpecies(
        list(class_names),
        prototypes.astype(np.float32),
        mu.astype(np.float32),
        species_rule,
        open_set_rule,
        threshold,
        model,
        counts.tolist(),
        loo,
    )


def fit_fewshot(
    refs: str | os.PathLike,
    model: ModelSpec = DEFAULT_MODEL,
    *,
    output: str | os.PathLike | None = None,
    background: str | os.PathLike | None = None,
    batch_size: int = 16,
    workers: int | None = None,
    device=None,
    amp: bool = False,
    tta: bool = False,
    size: tuple[int, int] | int | None = None,
    progress: bool = False,
    backend: str = "torch",
) -> ExtraSpecies:
    """Fit few-shot species from REFS (a class-folder tree, or a path,label CSV) and write them to `output`.
    `background`: an index folder (made by the same model) of photos that are mostly none of these species,
    e.g. the user's own collection: up to BACKGROUND_MAX of them centre the embeddings and calibrate "unknown"."""
    data = load_labelled(refs)
    net, info = resolve_model(model, device=device, size=size, backend=backend)
    identity = ModelIdentity.of(model, net, info, tta=tta)
    base = None
    if background is not None:
        index = open_index(background)
        index.check_model(identity)
        pick = np.random.default_rng(0).permutation(len(index))[:BACKGROUND_MAX]
        base = index.vectors.take(np.sort(pick)) if len(pick) else None
    paths, vectors, run = embed_images(
        list(data.paths), net, info, tta=tta, batch_size=batch_size, workers=workers, amp=amp, progress=progress
    )
    for path, reason in run.errors:
        logger.warning("%s: %s (left out)", path, reason)
    label_of = dict(zip(data.paths, data.labels.tolist()))
    names = data.class_names
    labels = np.array([label_of[p] for p in paths], dtype=np.int64)
    present = np.unique(labels) if len(labels) else np.zeros(0, np.int64)
    missing = [names[c] for c in range(len(names)) if c not in set(present.tolist())]
    if missing:
        logger.warning("no usable photo for %s: left out", ", ".join(missing))
    if not len(paths):
        raise HieraxError(f"no reference photo in {refs} could be read")
    remap = {int(c): i for i, c in enumerate(present)}
    species = fit_prototypes(
        vectors, [remap[int(c)] for c in labels], [names[c] for c in present], identity, background=base
    )
    if output is not None:
        species.save(output)
    return species
