"""A warning for runs that are not learning: the training loss still at the chance level after a share of the run.

A classifier that has learnt nothing predicts the uniform distribution, whose cross entropy is ln(classes)
against any target (one-hot, smoothed or mixed). A run whose mean loss over the steps just before
`STUCK_SHARE` of the run is still within 5% of that level is almost always broken (labels that do not match the
images, a learning rate of 0 or far too high or low), and the user should hear it long before the end of the
run. The check is made once, on every rank (the mean is reduced over ranks), and recorded in metrics.jsonl."""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)

STUCK_SHARE = 0.3  # check once, when this share of the run's steps is done (past the longest default warmup)
WINDOW_SHARE = 0.1  # over the mean loss of the steps in this share of the run just before the check
STUCK_RATIO = 0.95  # stuck: that mean is still above this share of the chance loss
MIN_CHECK_STEPS = 20  # runs shorter than this at the check point are too short to tell


class StuckLossCheck:
    """Collects the loss of the steps before the check point and says, once, whether the run looks stuck."""

    def __init__(self, chance_loss: float | None, total_steps: int) -> None:
        self.check_at = max(1, math.ceil(STUCK_SHARE * total_steps))
        self.chance_loss = chance_loss if self.check_at >= MIN_CHECK_STEPS else None
        self.window_start = max(0, self.check_at - max(1, round(WINDOW_SHARE * total_steps)))
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, step: int, loss: torch.Tensor) -> None:
        """Record the loss of the 0-based optimizer step `step` (a detached 0-d tensor: no device sync here)."""
        if self.chance_loss is None or not self.window_start <= step < self.check_at:
            return
        self.total = loss if self.total is None else self.total + loss
        self.count += 1

    def due(self, steps_done: int) -> bool:
        """True right after the step at which the check is made (on every rank: it may need a reduction)."""
        return self.chance_loss is not None and steps_done == self.check_at and self.count > 0

    def mean(self) -> torch.Tensor:
        """The window's mean loss on this rank (a 0-d tensor, to reduce over ranks)."""
        return self.total / max(self.count, 1)

    def report(self, mean_loss: float, peak_lr: float) -> dict:
        """Log a warning when `mean_loss` (the window's, reduced over ranks) is still near chance; returns the
        check's metrics record (split "check", "stuck" true or false)."""
        stuck = self.chance_loss is not None and mean_loss >= STUCK_RATIO * self.chance_loss
        if stuck:
            logger.warning(
                "training looks stuck: after %d steps (%.0f%% of the run) the training loss is %.3f, and a model "
                "that has learnt nothing scores %.3f; check that the labels match the images, and the learning "
                "rate (peak %.2g)",
                self.check_at,
                100 * STUCK_SHARE,
                mean_loss,
                self.chance_loss,
                peak_lr,
            )
        return {
            "split": "check",
            "step": self.check_at,
            "loss": mean_loss,
            "chance_loss": self.chance_loss,
            "stuck": stuck,
        }
