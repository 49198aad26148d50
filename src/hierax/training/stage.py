"""The contract between the training engine and a stage: `TrainConfig`, `Stage` and `StepContext`.

A stage defines its model, its data, its loss and its step; the engine (`engine.py`) owns everything else.

    class MyStage(Stage):                # override what the stage needs; defaults in brackets
        model: nn.Module                 # required: the trainable module (engine moves it, wraps it in DDP)
        train_dataset: Dataset           # required: items are samples; a dict sample with a non-None "error"
                                         # (as hierax.data.datasets.ImageDataset gives) is reported and replaced
                                         # by another index, so every batch keeps its size
        chance_loss: float | None        # the loss of a model that has learnt nothing (ln(classes) for a
                                         # classifier): the engine warns when the run does not move off it [None]
        def collate(self, samples) -> batch                    [hierax.data.datasets.collate_samples]
        def param_groups(self, config) -> list[dict]           [optim.param_groups(self.model, ...)]
        def training_step(self, model, batch, ctx) -> (loss, {name: float or 0-d tensor})   required
                                         # `model` is the DDP / compiled wrapper: call it, don't save it;
                                         # the batch is already on ctx.device; runs under autocast
        def before_optimizer_step(self, ctx)   after backward, before unscale/clip/step (e.g. zero a frozen
                                               layer's grads)                                  [no-op]
        def after_optimizer_step(self, ctx)    after the step and the EMA update (e.g. other momentum
                                               updates)                                        [no-op]
        def ema_decay(self, ctx) -> float | None   the EMA decay at ctx.step; None: the engine's own
                                               (config.ema_decay or one scaled to the run)     [None]
        def on_train_start(self, ctx)   every rank, before the first step, while the process is small (e.g.
                                               fork a validation loader's workers)             [no-op]
        def validate(self, module, ctx) -> dict[str, float]   at each epoch end on every rank; `module` is
                                               the EMA module when there is one; reduce with ctx.dist  [{}]
        def export(self, module, ctx) -> (state_dict, ModelInfo) | None   the model checkpoint content,
                                               written by rank 0 to output_dir/model.pt          [None]
        def state_dict(self) / load_state_dict(state)   extra state for exact resume (e.g. a centre) [{}]
        def on_train_end(self, history, ctx)   rank 0, after the last checkpoint (e.g. plots)   [no-op]

    StepContext (ctx): step (optimizer steps done; inside training_step and the optimizer-step hooks, the
        0-based index of the step being taken), epoch, total_steps, steps_per_epoch, micro_step (accumulation),
        progress (step / total_steps), device, dist (DistInfo: rank, world_size, is_main, all_reduce_mean,
        all_reduce_sum, barrier), ema (ModelEMA or None; ctx.ema.module is the averaged copy: a DINO teacher),
        config, output_dir, autocast() (the run's autocast context), lr (of the first group).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from hierax.data.datasets import collate_samples
from hierax.distributed import DistInfo
from hierax.errors import HieraxError
from hierax.training import optim
from hierax.training.ema import ModelEMA
from hierax.training.loader import default_workers


@dataclass
class TrainConfig:
    """Everything the engine needs to run a stage; stage-specific options live in the stage."""

    output_dir: Path
    epochs: int = 10
    batch_size: int = 32  # per process and micro-step; global batch = batch_size * accum_steps * world_size
    accum_steps: int = 1
    lr: float = 5e-4
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine weight-decay schedule end (None: constant)
    layer_decay: float | None = None  # None: 1.0 unless the stage chooses (fine-tuning: 0.65 from pretrained)
    warmup_epochs: float | None = None  # None: optim.warmup_steps (5% of the run, at least 100 steps or 20%)
    clip_grad: float | None = 1.0
    ema: bool = True
    ema_decay: float | None = None  # None: scaled to the run (optim.auto_ema_decay)
    amp: bool | None = None  # None: bf16 autocast on CUDA only
    amp_dtype: str = "bfloat16"  # or "float16" (with a gradient scaler)
    compile: bool = False
    grad_checkpointing: bool = False
    num_workers: int | None = None  # None: loader.default_workers() (min(4, CPU count))
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 0  # optimizer steps; 0: at each epoch end only
    resume: bool = False
    device: str | None = None  # None: CUDA when available (cuda:LOCAL_RANK under torchrun), else CPU
    max_bad_retries: int = 16

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.epochs < 1 or self.batch_size < 1 or self.accum_steps < 1:
            raise HieraxError("epochs, batch size and accumulation steps must be at least 1")
        if self.num_workers is None:
            self.num_workers = default_workers()


@dataclass
class StepContext:
    """What a stage's hooks see of the run (see the module docstring)."""

    config: TrainConfig
    dist: DistInfo
    total_steps: int
    steps_per_epoch: int
    step: int = 0
    micro_step: int = 0
    lr: float = 0.0
    ema: ModelEMA | None = None
    amp_enabled: bool = False
    amp_dtype: torch.dtype = torch.bfloat16

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def progress(self) -> float:
        return self.step / self.total_steps

    @property
    def output_dir(self) -> Path:
        return self.config.output_dir

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's autocast context (a no-op when mixed precision is off)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_enabled)


class Stage:
    """Base class of a training stage; see the module docstring for the hooks a stage overrides."""

    model: nn.Module
    train_dataset: Dataset
    chance_loss: float | None = None

    def collate(self, samples: list) -> Any:
        return collate_samples(samples)

    def param_groups(self, config: TrainConfig) -> list[dict]:
        return optim.param_groups(self.model, config.weight_decay, config.layer_decay or 1.0)

    def training_step(self, model: nn.Module, batch: Any, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def before_optimizer_step(self, ctx: StepContext) -> None:
        """Called after backward and before clipping and the optimizer step."""

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """Called after the optimizer step and the EMA update."""

    def ema_decay(self, ctx: StepContext) -> float | None:
        return None

    def on_train_start(self, ctx: StepContext) -> None:
        """Called on every rank before the first step (and the training loader's workers fork)."""

    def validate(self, module: nn.Module, ctx: StepContext) -> dict[str, float]:
        return {}

    def export(self, module: nn.Module, ctx: StepContext) -> tuple[dict, Any] | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""

    def on_train_end(self, history: list[dict], ctx: StepContext) -> None:
        """Called on rank 0 after the last checkpoint."""
