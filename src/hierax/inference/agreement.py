"""How closely a candidate model (an int8 or bf16 export, a compiled or re-trained copy) follows a reference on
the user's own photos: top-1 agreement, top-5 overlap, the largest probability change, the photos whose answer
changed, and each model's speed on this machine. Answers "is the fast path good enough here?" where a table
measured on another model or CPU cannot.

Every photo is decoded once and both models see the same pixels; the two alternate which runs first on each batch,
so a machine whose speed drifts does not favour either."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from hierax.data.sources import find_images
from hierax.errors import HieraxError
from hierax.inference.classification import infer_batch
from hierax.inference.loading import ModelSpec, make_loader, resolve_model
from hierax.transforms import classification_transform


@dataclass
class Changed:
    """A photo whose top-1 class differs: the class and its probability under each model."""

    path: str
    reference: str
    reference_prob: float
    candidate: str
    candidate_prob: float


@dataclass
class Agreement:
    """What `compare_models` found. Rates are shares of the photos both models ran on (0..1)."""

    images: int
    top1: float
    top5_overlap: float
    max_prob_change: float
    changed: list[Changed]
    reference_seconds: float
    candidate_seconds: float
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        """The candidate's speed over the reference's (above 1: the candidate is faster)."""
        return self.reference_seconds / self.candidate_seconds if self.candidate_seconds else float("nan")

    def summary(self, shown: int = 10) -> str:
        """Lines for a terminal: the rates, the speeds, the first `shown` changed photos and any failures."""
        lines = [
            f"agreement with the reference on {self.images} photos: top-1 {self.top1:.1%}, top-5 overlap "
            f"{self.top5_overlap:.1%}, largest probability change {self.max_prob_change:.4f}"
        ]
        ref, cand = self.images / self.reference_seconds, self.images / self.candidate_seconds
        lines.append(
            f"speed (model only, decoding apart): reference {ref:.2f} img/s, candidate {cand:.2f} img/s "
            f"({self.speedup:.2f}x)"
        )
        for c in self.changed[:shown]:
            lines.append(
                f"  changed: {c.path}: {c.reference} ({c.reference_prob:.3f}) -> {c.candidate} ({c.candidate_prob:.3f})"
            )
        if len(self.changed) > shown:
            lines.append(f"  ... and {len(self.changed) - shown} more changed")
        lines += [f"  failed: {path}: {reason}" for path, reason in self.errors]
        return "\n".join(lines)


def _top_k(probs: np.ndarray, k: int) -> np.ndarray:
    k = min(k, probs.shape[1])
    return np.argsort(-probs, axis=1, kind="stable")[:, :k]


def compare_models(
    reference: ModelSpec,
    candidate: ModelSpec,
    sources: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    size: tuple[int, int] | int | None = None,
    batch_size: int = 8,
    workers: int | None = None,
    reference_amp: bool = False,
    candidate_amp: bool = False,
    device: str | None = None,
) -> Agreement:
    """Run `reference` and `candidate` (names, paths, exported files or loaded (net, info) pairs) over the images
    of `sources` and measure how far the candidate's answers move. Both must share the reference's classes; the
    images are preprocessed as the reference's info says, at `size` (default: the reference's). `*_amp` runs that
    model under bf16 autocast. Each model runs the first batch once untimed before the timed passes."""
    paths = find_images(sources)
    ref_net, ref_info = resolve_model(reference, device=device, size=size)
    cand_net, cand_info = resolve_model(candidate, device=device, size=size or ref_info.size)
    if cand_info.class_names != ref_info.class_names:
        raise HieraxError(
            f"the two models have different classes ({ref_info.num_classes} and {cand_info.num_classes}, or in "
            "another order): agreement needs the same class list"
        )
    transform = classification_transform(ref_info.size, ref_info.rgb_stats)
    loader = make_loader(paths, transform, batch_size=batch_size, workers=workers)
    runs = {"reference": (ref_net, reference_amp), "candidate": (cand_net, candidate_amp)}
    seconds = dict.fromkeys(runs, 0.0)
    probs: dict[str, list[np.ndarray]] = {name: [] for name in runs}
    done: list[str] = []
    errors: list[tuple[str, str]] = []
    for number, batch in enumerate(loader):
        errors += [(path, reason) for _, path, reason in batch["errors"]]
        if batch["images"] is None:
            continue
        if not done:  # an untimed warm-up call each: first calls pay for allocation and kernel choice
            for net, amp in runs.values():
                infer_batch(net, batch["images"], amp=amp)
        order: Sequence[str] = list(runs) if number % 2 == 0 else list(runs)[::-1]
        for name in order:
            net, amp = runs[name]
            start = time.perf_counter()
            probs[name].append(infer_batch(net, batch["images"], amp=amp)[0])
            seconds[name] += time.perf_counter() - start
        done += batch["paths"]
    if not done:
        raise HieraxError(f"none of the {len(paths)} images could be read: {errors[0][0]}: {errors[0][1]}")
    ref, cand = np.concatenate(probs["reference"]), np.concatenate(probs["candidate"])
    ref5, cand5 = _top_k(ref, 5), _top_k(cand, 5)
    same = ref5[:, 0] == cand5[:, 0]
    overlap = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ref5, cand5, strict=True)])
    names = ref_info.class_names
    changed = [
        Changed(done[i], names[ref5[i, 0]], float(ref[i, ref5[i, 0]]), names[cand5[i, 0]], float(cand[i, cand5[i, 0]]))
        for i in np.flatnonzero(~same)
    ]
    return Agreement(
        images=len(done),
        top1=float(same.mean()),
        top5_overlap=float(overlap),
        max_prob_change=float(np.abs(ref - cand).max()),
        changed=changed,
        reference_seconds=seconds["reference"],
        candidate_seconds=seconds["candidate"],
        errors=errors,
    )
