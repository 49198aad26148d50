"""Losses of DINOv2 pretraining: teacher targets (Sinkhorn-Knopp or softmax centering), the DINO cross-entropy
between crops, the iBOT masked-token loss and the KoLeo spreading regulariser.

All reductions over the batch are correct under DDP: Sinkhorn-Knopp and the running centre all-reduce their sums
across processes, so N processes see the same targets as one process with the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Balanced soft assignments (N, K) of N samples to K prototypes (rows sum to 1).

    Alternately normalises prototypes to equal total mass and samples to unit mass, which keeps every
    prototype in use and is what prevents collapse without a running centre. `N` is the local count; under
    DDP the sums run over all processes."""
    logits = teacher_logits.float() / temperature
    # subtracting the global max keeps exp finite and cancels out in the normalisation
    shift = logits.max().detach() if logits.numel() else logits.new_tensor(-torch.inf)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q = torch.exp(logits - shift).t()  # (K, N)
    k = q.shape[0]
    n = torch.tensor(float(q.shape[1]), device=q.device)
    n = _all_reduce_sum(n)
    q /= _all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= _all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(1e-30)
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30)
        q /= n
    return (q * n).t()


class SoftmaxCentering(nn.Module):
    """Teacher targets softmax((logits - centre) / T); the centre is an EMA of the teacher's mean logits."""

    def __init__(self, num_prototypes: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, num_prototypes))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Targets for `teacher_logits` (N, K), then the centre moves towards this batch's mean."""
        logits = teacher_logits.float()
        probs = F.softmax((logits - self.center) / temperature, dim=-1)
        total = _all_reduce_sum(logits.sum(dim=0, keepdim=True))
        count = _all_reduce_sum(torch.tensor(float(logits.shape[0]), device=logits.device))
        self.center.mul_(self.momentum).add_(total / count.clamp_min(1.0), alpha=1 - self.momentum)
        return probs


class TeacherTargets(nn.Module):
    """Turns teacher logits into soft targets, by Sinkhorn-Knopp or by softmax centering."""

    def __init__(self, num_prototypes: int, method: str = "sinkhorn", iterations: int = 3) -> None:
        super().__init__()
        if method not in ("sinkhorn", "centering"):
            raise ValueError(f"unknown teacher target method '{method}': use 'sinkhorn' or 'centering'")
        self.method = method
        self.iterations = iterations
        self.centering = SoftmaxCentering(num_prototypes)

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        if self.method == "sinkhorn":
            return sinkhorn_knopp(teacher_logits, temperature, self.iterations)
        return self.centering(teacher_logits, temperature)


def soft_cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-row cross-entropy -sum(t * log_softmax(s / T)) (N,)."""
    return -(targets * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)


def dino_loss(
    student_logits: list[torch.Tensor],
    teacher_targets: list[torch.Tensor],
    student_temp: float = 0.1,
) -> torch.Tensor:
    """Mean cross-entropy over every (student crop, teacher crop) pair of different views.

    `student_logits` lists every crop (the global ones first, in the teacher's order), each (B, K);
    `teacher_targets` lists the global crops. A student global crop is not compared with its own view.
    The cross-entropy is linear in the targets, so each student crop takes one log-softmax against the sum of
    the targets it is compared with: a local crop's (B, K) log-probabilities are kept for backward once, not once
    per teacher crop."""
    total = student_logits[0].new_zeros((), dtype=torch.float32)
    all_targets = torch.stack(teacher_targets).sum(dim=0)
    pairs = 0
    for s_idx, s in enumerate(student_logits):
        own = s_idx < len(teacher_targets)
        targets = all_targets - teacher_targets[s_idx] if own else all_targets
        count = len(teacher_targets) - int(own)
        if count:
            total = total + soft_cross_entropy(s, targets, student_temp).mean()
            pairs += count
    if pairs == 0:
        raise ValueError("the DINO loss needs at least two crops")
    return total / pairs


def ibot_loss(
    student_logits: torch.Tensor,
    teacher_targets: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """iBOT loss over masked tokens: each image's masked tokens weigh 1/(its masked count), averaged over images.

    `student_logits` and `teacher_targets` are (M, K) for the M masked tokens, in the order of `masks` (B, h, w)
    flattened. Images without a masked token still count in the denominator, as in DINOv2."""
    flat = masks.flatten(1)
    per_image = flat.sum(dim=1, keepdim=True).clamp_min(1).float()
    weights = (1.0 / per_image).expand_as(flat)[flat]
    if weights.numel() == 0:
        return student_logits.sum() * 0.0
    loss = soft_cross_entropy(student_logits, teacher_targets, student_temp)
    return (loss * weights).sum() / flat.shape[0]


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimate: -mean log distance of each L2-normalised row to its nearest other row.

    Spreads the batch's features uniformly over the sphere, which keeps a short run from packing images together."""
    if features.shape[0] < 2:
        return features.sum() * 0.0
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sim = x @ x.t()
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(dim=1)
    dist_ = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(dist_ + eps).mean()


def teacher_entropy(targets: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats, 0-d tensor) of the teacher's per-sample targets: near 0 means one-hot targets, near
    log K uniform ones."""
    t = targets.detach().float().clamp_min(1e-12)
    return -(t * t.log()).sum(dim=-1).mean()
