"""The DINOv2 recipe: its hyper-parameters (`DinoConfig`) and the per-step schedules of one run (`DinoSchedule`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hierax.training import optim
from hierax.training.dino_data import MultiCropConfig


@dataclass
class DinoConfig:
    """The method's hyper-parameters (DINOv2's defaults); schedules are in epochs, capped by share of the run."""

    num_prototypes: int = 65536
    ibot_prototypes: int | None = None  # None: same as num_prototypes
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    student_temp: float = 0.1
    teacher_temp_start: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_epochs: float = 30.0
    teacher_temp_warmup_share: float = 0.3
    targets: str = "sinkhorn"  # or "centering"
    sinkhorn_iterations: int = 3
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    momentum_start: float = 0.992
    momentum_end: float = 1.0
    freeze_last_layer_epochs: float = 1.0
    freeze_last_layer_share: float = 0.1
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    knn_path: str | None = None  # a labelled folder for the k-NN probe
    knn_every: int = 0  # optimizer steps between probes; 0: at each epoch end only


@dataclass(frozen=True)
class DinoSchedule:
    """The per-step schedules of one run, resolved from a DinoConfig and the run's length."""

    total_steps: int
    teacher_temp_warmup_steps: int
    freeze_last_layer_steps: int
    config: DinoConfig

    @classmethod
    def for_run(cls, config: DinoConfig, total_steps: int, steps_per_epoch: int) -> DinoSchedule:
        """Cap the epoch-based warmups at their share of the run. The teacher momentum is not shortened: its
        0.992 start keeps a short run's teacher (the exported backbone) near the starting weights."""
        temp_warmup = min(
            config.teacher_temp_warmup_epochs * steps_per_epoch, config.teacher_temp_warmup_share * total_steps
        )
        freeze = min(config.freeze_last_layer_epochs * steps_per_epoch, config.freeze_last_layer_share * total_steps)
        return cls(total_steps, round(temp_warmup), round(freeze), config)

    def teacher_temp(self, step: int) -> float:
        """Linear warmup from teacher_temp_start to teacher_temp, then constant."""
        c = self.config
        if step >= self.teacher_temp_warmup_steps:
            return c.teacher_temp
        return c.teacher_temp_start + (c.teacher_temp - c.teacher_temp_start) * step / self.teacher_temp_warmup_steps

    def momentum(self, step: int) -> float:
        """Teacher EMA momentum: cosine from momentum_start to momentum_end over the run."""
        return optim.cosine_value(step, self.total_steps, self.config.momentum_start, self.config.momentum_end)

    def last_layer_frozen(self, step: int) -> bool:
        return step < self.freeze_last_layer_steps


# DINOv2 counts its schedules in "epochs" of 1,250 iterations: its learning rate warms up over 12,500 of them.
DINOV2_WARMUP_STEPS = 12_500


def warmup_epochs(epochs: int, steps_per_epoch: int) -> float:
    """The learning-rate warmup, in epochs of this run: DINOv2's 10 epochs at most 10% of the run (a long run's
    recipe), or DINOv2's 12,500 iterations at most half the run, whichever is longer.

    A run much shorter than DINOv2's warmup never gets informative teacher targets (they stay near uniform), so
    every backbone step at full learning rate only moves the features away from where they started; the
    half-run warmup keeps those steps small."""
    dinov2 = min(10.0, 0.1 * epochs)
    short = min(DINOV2_WARMUP_STEPS / max(1, steps_per_epoch), 0.5 * epochs)
    return max(dinov2, short)


def default_lr(global_batch: int) -> float:
    """DINOv2's learning rate: 0.004 at a batch of 1024, scaled by the square root of the batch."""
    return 0.004 * math.sqrt(global_batch / 1024)
