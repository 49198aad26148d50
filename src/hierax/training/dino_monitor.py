"""Monitoring of DINOv2 pretraining: k-NN top-1 of the backbone's embeddings, and collapse detection."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hierax.data.datasets import ImageDataset, collate_samples, load_labelled
from hierax.models.hieradet import HieraDet
from hierax.transforms import classification_transform

logger = logging.getLogger(__name__)


def knn_top1(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor | None = None,
    query_labels: torch.Tensor | None = None,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of a weighted k-NN vote (cosine similarity, weights exp(sim / T), as in DINO).

    Without `queries`, every bank sample is classified by the others (leave-one-out)."""
    bank = F.normalize(bank.float(), dim=1)
    leave_one_out = queries is None
    queries = bank if leave_one_out else F.normalize(queries.float(), dim=1)
    query_labels = bank_labels if leave_one_out else query_labels
    sim = queries @ bank.t()
    if leave_one_out:
        sim.fill_diagonal_(-math.inf)
    k = min(k, bank.shape[0] - int(leave_one_out))
    top_sim, top_idx = sim.topk(k, dim=1)
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    votes = torch.zeros(queries.shape[0], num_classes)
    votes.scatter_add_(1, bank_labels[top_idx], torch.exp(top_sim / temperature))
    return float((votes.argmax(dim=1) == query_labels).float().mean())


@torch.no_grad()
def embed_images(
    backbone: HieraDet,
    images: torch.Tensor | ImageDataset,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(N, C) embeddings of a float image batch (already normalised) or of an ImageDataset with a transform."""
    was_training = backbone.training
    backbone.eval()
    out = []
    if isinstance(images, torch.Tensor):
        for start in range(0, images.shape[0], batch_size):
            out.append(backbone.embedding(images[start : start + batch_size].to(device)).float().cpu())
    else:
        loader = DataLoader(images, batch_size=batch_size, collate_fn=collate_samples)
        for batch in loader:
            if batch["images"] is not None:
                out.append(backbone.embedding(batch["images"].to(device)).float().cpu())
    backbone.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, backbone.embedding_size)


class KnnProbe:
    """Leave-one-out k-NN top-1 on a labelled folder (any layout `load_labelled` reads), resized to `size`."""

    def __init__(self, path: str, size: tuple[int, int], rgb_stats: dict | None = None, k: int = 20) -> None:
        data = load_labelled(path)
        self.labels = torch.from_numpy(np.asarray(data.labels))
        self.dataset = ImageDataset.from_labelled(data, classification_transform(size, rgb_stats))
        self.k = k

    def __call__(self, backbone: HieraDet, device: torch.device | str = "cpu") -> float:
        """k-NN top-1 (0-1) of `backbone`'s embeddings."""
        feats = embed_images(backbone, self.dataset, device=device)
        if feats.shape[0] != self.labels.shape[0]:
            logger.warning(
                "k-NN probe: %d of %d images could not be read",
                self.labels.shape[0] - feats.shape[0],
                self.labels.shape[0],
            )
            return float("nan")
        return knn_top1(feats, self.labels, k=self.k)


def feature_spread(features: torch.Tensor) -> torch.Tensor:
    """Per-dimension std over the batch of L2-normalised features, times sqrt(dim) (0-d tensor): about 1 for
    features spread over the sphere, 0 when every image maps to the same point (collapse)."""
    x = F.normalize(features.detach().float(), dim=-1)
    if x.shape[0] < 2:
        return x.new_tensor(float("nan"))
    return x.std(dim=0).mean() * math.sqrt(x.shape[1])


class CollapseMonitor:
    """Warns (once per kind) when the teacher's features collapse or its targets become uniform."""

    def __init__(self, num_prototypes: int, spread_drop: float = 0.2, uniform_fraction: float = 0.98) -> None:
        self.log_k = math.log(num_prototypes)
        self.spread_drop = spread_drop
        self.uniform_fraction = uniform_fraction
        self.initial_spread: float | None = None
        self.warned: set[str] = set()

    def check(self, spread: float, entropy: float, after_warmup: bool) -> list[str]:
        """Return (and log) the warnings this observation triggers for the first time."""
        if self.initial_spread is None and math.isfinite(spread):
            self.initial_spread = spread
        found = []
        if self.initial_spread and spread < self.spread_drop * self.initial_spread:
            found.append(
                f"feature collapse: teacher feature spread fell to {spread:.4f} from {self.initial_spread:.4f}; "
                "lower the learning rate, raise the teacher momentum, or use --targets sinkhorn"
            )
        if after_warmup and entropy > self.uniform_fraction * self.log_k:
            found.append(
                f"uniform collapse: teacher targets have entropy {entropy:.2f} of at most {self.log_k:.2f} nats, "
                "so they say little about the images. Expected for the first thousands of steps (DINOv2 warms up "
                "over 12,500); if it lasts in a long run, lower the teacher temperature or the number of prototypes"
            )
        new = [w for w in found if w.split(":")[0] not in self.warned]
        for warning in new:
            self.warned.add(warning.split(":")[0])
            logger.warning("%s", warning)
        return new


class KnnTracker:
    """The k-NN probes of one run: the starting weights' score (step 0), the best backbone so far (teacher or
    student) and the last teacher (the exported backbone).

    `observe` says which backbone, if any, is the best yet (the caller keeps it) and warns when the teacher falls
    below where the run started; ties keep the earlier, so a run that never improves keeps its start."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.best: float | None = None
        self.best_step = 0
        self.best_of = "teacher"
        self.last: float | None = None
        self.last_step = 0

    def observe(self, step: int, teacher: float, student: float | None = None) -> str | None:
        """Record the probes at `step` (0: the starting weights); returns "teacher" or "student" when that one is
        the best so far, else None. NaN (an unreadable probe set) records nothing."""
        if not math.isfinite(teacher):
            return None
        if self.start is None:
            self.start = teacher
        was_below = self.last is not None and self.last < self.start
        self.last, self.last_step = teacher, step
        if teacher < self.start and not was_below:
            logger.warning(
                "k-NN top-1 %.4f at step %d is below the starting weights' %.4f: the run is making the features "
                "worse. The best backbone (k-NN %.4f, step %d) is kept apart; on a small set, try fewer epochs, a "
                "lower --lr or more images",
                teacher,
                step,
                self.start,
                self.best if self.best is not None else self.start,
                self.best_step,
            )
        found = None
        for name, score in (("teacher", teacher), ("student", student)):
            if score is not None and math.isfinite(score) and (self.best is None or score > self.best):
                self.best, self.best_step, self.best_of, found = score, step, name, name
        return found

    def summary(self) -> dict[str, float]:
        """The start, best and last scores (empty before the first probe)."""
        if self.start is None:
            return {}
        return {"knn_start": self.start, "knn_best": self.best, "knn_last": self.last}

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("start", "best", "best_step", "best_of", "last", "last_step")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
