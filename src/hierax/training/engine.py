"""The training engine shared by fine-tuning (`supervised.py`) and DINOv2 pretraining (`dino_v2.py`).

A stage defines its model wrapper, its loss and its step; the engine owns everything else: distributed setup,
the data order, the loop, bf16 autocast, gradient accumulation and clipping, the optimizer and its schedules,
model EMA, checkpoints, exact resume and the metrics log.

API
---
    config = TrainConfig(output_dir=..., epochs=..., batch_size=..., lr=..., ...)   # see the field comments
    dist = init_distributed()            # hierax.distributed: torchrun env; gloo on CPU, nccl on CUDA
    seed_everything(config.seed)         # hierax.distributed: before building the stage (reproducible init)
    history = Engine(stage, config, dist).fit()     # -> list of metric records (also in metrics.jsonl)
    close_distributed(dist)              # leave the process group (no-op in a single process)

    class MyStage(Stage):                # override what the stage needs; defaults in brackets
        model: nn.Module                 # required: the trainable module (engine moves it, wraps it in DDP)
        train_dataset: Dataset           # required: items are samples; a dict sample with a non-None "error"
                                         # (as hierax.data.datasets.ImageDataset gives) is reported and replaced
                                         # by the next index, so every batch keeps its size
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

Data order: each epoch a permutation seeded by (seed, epoch); micro-batch m of the epoch takes the next
batch_size * world_size positions, rank r the r-th slice, so 1 process with batch 2B and 2 processes with batch
B see the same images per step. Each sample's augmentation runs under a torch RNG seeded by (seed, epoch,
position), so the result does not depend on workers, ranks or resumes. The last incomplete step is dropped.

Files in output_dir: model.pt (stage.export, reference .pt layout: EMA weights when EMA is on),
training_state.pt (raw weights, optimizer, EMA, scaler, stage state, per-rank RNG states, step, history),
metrics.jsonl (one JSON record per log interval and per validation), bad_samples.jsonl (skipped images).
Every file is written to a temporary name and renamed, so a kill leaves the last good version.
`config.resume` continues from training_state.pt exactly: same weights as an uninterrupted run on CPU.
LR: linear warmup then cosine to lr * min_lr_ratio; group "lr_scale" (layer decay) multiplies it. Weight
decay: cosine from weight_decay to weight_decay_end when set; groups with "weight_decay" 0 keep 0.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from hierax.distributed import DistInfo, init_distributed, seed_everything
from hierax.errors import CheckpointError, HieraxError
from hierax.training import optim
from hierax.training.loader import (
    EpochBatchSampler,
    SeededSamples,
    atomic_torch_save,
    atomic_write_text,
    to_device,
)

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.jsonl"
BAD_SAMPLES_FILE = "bad_samples.jsonl"


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
    warmup_epochs: float | None = None  # None: 5% of the run
    clip_grad: float | None = 1.0
    ema: bool = True
    ema_decay: float | None = None  # None: scaled to the run (optim.auto_ema_decay)
    amp: bool | None = None  # None: bf16 autocast on CUDA only
    amp_dtype: str = "bfloat16"  # or "float16" (with a gradient scaler)
    compile: bool = False
    grad_checkpointing: bool = False
    num_workers: int = 2
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


class ModelEMA:
    """An exponential moving average of a module's parameters (buffers copied): avg = d * avg + (1 - d) * param."""

    def __init__(self, module: nn.Module) -> None:
        self.module = copy.deepcopy(module)
        self.module.eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buf, buf in zip(self.module.buffers(), module.buffers(), strict=True):
            ema_buf.copy_(buf)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


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

    def collate(self, samples: list) -> Any:
        from hierax.data.datasets import collate_samples

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


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Engine:
    """Runs a Stage under a TrainConfig: `Engine(stage, config, dist).fit()` (see the module docstring)."""

    def __init__(self, stage: Stage, config: TrainConfig, dist: DistInfo | None = None) -> None:
        self.stage, self.config = stage, config
        self.dist = dist if dist is not None else init_distributed(config.device)
        self._seen_bad: set[str] = set()

    def fit(self) -> list[dict]:
        """Train to the end (or continue from the saved state with config.resume); returns the metric history."""
        cfg, dist, stage = self.config, self.dist, self.stage
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        n = len(stage.train_dataset)
        per_step = cfg.batch_size * dist.world_size * cfg.accum_steps
        steps_per_epoch = n // per_step
        if steps_per_epoch == 0:
            raise HieraxError(
                f"the training set has {n} images, fewer than one global batch of {per_step}; lower the batch size"
            )
        total = steps_per_epoch * cfg.epochs
        seed_everything(cfg.seed + dist.rank)

        self.module = stage.model.to(dist.device)
        if cfg.grad_checkpointing and hasattr(self.module, "set_grad_checkpointing"):
            self.module.set_grad_checkpointing(True)
        self.ema = ModelEMA(self.module) if cfg.ema else None
        groups = stage.param_groups(cfg)
        for g in groups:
            g.setdefault("lr_scale", 1.0)
            g["base_weight_decay"] = g.get("weight_decay", cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        amp = cfg.amp if cfg.amp is not None else dist.device.type == "cuda"
        amp_dtype = getattr(torch, cfg.amp_dtype)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=amp and amp_dtype == torch.float16)
        ctx = StepContext(cfg, dist, total, steps_per_epoch, ema=self.ema, amp_enabled=amp, amp_dtype=amp_dtype)
        self.warmup = optim.warmup_steps(total, steps_per_epoch, cfg.warmup_epochs)
        self.history: list[dict] = []
        state_path = cfg.output_dir / STATE_FILE
        if cfg.resume and state_path.exists():
            self._load_state(state_path, ctx, per_step)
        elif cfg.resume:
            logger.warning("--resume: no %s in %s, starting from scratch", STATE_FILE, cfg.output_dir)
        elif state_path.exists():
            raise HieraxError(
                f"{cfg.output_dir} holds an earlier run ({STATE_FILE}); pass --resume to continue it "
                "or choose another output directory"
            )
        if dist.is_main:
            atomic_write_text(cfg.output_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in self.history))
        train_model: nn.Module = self.module
        if dist.enabled:
            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(self.module, device_ids=device_ids)
        if cfg.compile:
            train_model = torch.compile(train_model)
        logger.info(
            "training %d steps (%d epochs of %d), global batch %d, %d process(es), warmup %d steps",
            total,
            cfg.epochs,
            steps_per_epoch,
            per_step,
            dist.world_size,
            self.warmup,
        )

        data = SeededSamples(stage.train_dataset, cfg.max_bad_retries)
        while ctx.step < total:
            epoch = ctx.step // steps_per_epoch
            start = (ctx.step % steps_per_epoch) * cfg.accum_steps
            sampler = EpochBatchSampler(
                n, cfg.batch_size, steps_per_epoch * cfg.accum_steps, dist.rank, dist.world_size, cfg.seed, epoch, start
            )
            loader = DataLoader(
                data,
                batch_sampler=sampler,
                num_workers=cfg.num_workers,
                collate_fn=self._collate,
                pin_memory=dist.device.type == "cuda",
                generator=torch.Generator().manual_seed(0),
            )
            self._run_epoch(train_model, loader, ctx)
        dist.barrier()
        if dist.is_main:
            stage.on_train_end(self.history, ctx)
        return self.history

    def _collate(self, items: list[tuple[Any, list]]) -> tuple[Any, list]:
        return self.stage.collate([s for s, _ in items]), [e for _, skipped in items for e in skipped]

    def _set_schedules(self, ctx: StepContext) -> None:
        cfg = self.config
        factor = optim.cosine_factor(ctx.step, ctx.total_steps, self.warmup, cfg.min_lr_ratio)
        wd = cfg.weight_decay
        if cfg.weight_decay_end is not None:
            wd = optim.cosine_value(ctx.step, ctx.total_steps, cfg.weight_decay, cfg.weight_decay_end)
        for g in self.optimizer.param_groups:
            g["lr"] = cfg.lr * factor * g["lr_scale"]
            g["weight_decay"] = wd if g["base_weight_decay"] > 0 else 0.0
        ctx.lr = self.optimizer.param_groups[0]["lr"]

    def _run_epoch(self, train_model: nn.Module, loader: DataLoader, ctx: StepContext) -> None:
        cfg, dist, stage = self.config, self.dist, self.stage
        epoch = ctx.epoch
        end = (epoch + 1) * ctx.steps_per_epoch
        params = [p for p in self.module.parameters() if p.requires_grad]
        sums: dict[str, torch.Tensor] = {}
        count, images, tick = 0, 0, time.perf_counter()
        batches = iter(loader)
        self.module.train()
        bar = tqdm(
            total=ctx.steps_per_epoch,
            initial=ctx.step % ctx.steps_per_epoch,
            desc=f"epoch {epoch + 1}",
            disable=not dist.is_main,
            leave=False,
            dynamic_ncols=True,
        )
        while ctx.step < end:
            self._set_schedules(ctx)
            for micro in range(cfg.accum_steps):
                ctx.micro_step = micro
                batch, skipped = next(batches)
                self._report_bad(skipped)
                batch = to_device(batch, dist.device)
                syncing = micro == cfg.accum_steps - 1 or not dist.enabled
                with contextlib.nullcontext() if syncing else train_model.no_sync():
                    with ctx.autocast():
                        loss, metrics = stage.training_step(train_model, batch, ctx)
                    self.scaler.scale(loss / cfg.accum_steps).backward()
                for k, v in {"loss": loss, **metrics}.items():
                    v = torch.as_tensor(v, dtype=torch.float32).detach().to(dist.device) / cfg.accum_steps
                    sums[k] = sums[k] + v if k in sums else v
                images += cfg.batch_size * dist.world_size
            stage.before_optimizer_step(ctx)
            if cfg.clip_grad:
                self.scaler.unscale_(self.optimizer)
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
                sums["grad_norm"] = sums["grad_norm"] + norm.float() if "grad_norm" in sums else norm.float()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                decay = stage.ema_decay(ctx)
                if decay is None:
                    decay = optim.ema_decay_at(ctx.step, ctx.total_steps, self.config.ema_decay)
                self.ema.update(self.module, decay)
            stage.after_optimizer_step(ctx)
            ctx.step += 1
            count += 1
            bar.update(1)
            if ctx.step % cfg.log_every == 0 or ctx.step == end:
                record = {
                    "split": "train",
                    "step": ctx.step,
                    "epoch": round(ctx.step / ctx.steps_per_epoch, 4),
                    "lr": ctx.lr,
                }
                for k, v in sums.items():
                    record[k] = float(dist.all_reduce_mean(v / count))
                record["images_per_s"] = round(images / max(time.perf_counter() - tick, 1e-9), 2)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                self._log(record)
                if not math.isfinite(record["loss"]):
                    raise HieraxError(
                        f"the loss is {record['loss']} at step {ctx.step}: lower --lr, or resume from "
                        "the last checkpoint with a smaller one"
                    )
                sums, count, images, tick = {}, 0, 0, time.perf_counter()
            if ctx.step == end:
                self._validate(ctx)
            if ctx.step == end or (cfg.checkpoint_every and ctx.step % cfg.checkpoint_every == 0):
                self.save(ctx)
        bar.close()

    def _validate(self, ctx: StepContext) -> None:
        module = self.ema.module if self.ema is not None else self.module
        module.eval()
        with torch.no_grad():
            metrics = self.stage.validate(module, ctx)
        self.module.train()
        if metrics:
            record = {"split": "val", "step": ctx.step, "epoch": ctx.step // ctx.steps_per_epoch, **metrics}
            logger.info(
                "epoch %d: %s",
                record["epoch"],
                ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)),
            )
            self._log(record)

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.dist.is_main:
            with open(self.config.output_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            logger.debug("%s", record)

    def _report_bad(self, skipped: list) -> None:
        for index, path, reason in skipped:
            if path in self._seen_bad:
                continue
            self._seen_bad.add(path)
            logger.warning("skipped a bad training image %s: %s", path, reason)
            line = json.dumps({"index": index, "path": path, "reason": reason, "rank": self.dist.rank})
            with open(self.config.output_dir / BAD_SAMPLES_FILE, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    def save(self, ctx: StepContext) -> None:
        """Write the model checkpoint and the training state (rank 0; every rank contributes its RNG state)."""
        rng = [_rng_state()]
        if self.dist.enabled:
            gathered: list = [None] * self.dist.world_size
            torch_dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if self.dist.is_main:
            module = self.ema.module if self.ema is not None else self.module
            exported = self.stage.export(module, ctx)
            if exported is not None:
                from hierax.weights.files import write_checkpoint

                write_checkpoint(self.config.output_dir / MODEL_FILE, *exported)
            cfg = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()}
            state = {
                "step": ctx.step,
                "total_steps": ctx.total_steps,
                "world_size": self.dist.world_size,
                "global_batch": self.config.batch_size * self.dist.world_size * self.config.accum_steps,
                "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "stage": self.stage.state_dict(),
                "rng": rng,
                "history": self.history,
                "config": cfg,
            }
            atomic_torch_save(state, self.config.output_dir / STATE_FILE)
            logger.debug("saved the training state at step %d", ctx.step)
        self.dist.barrier()

    def _load_state(self, path: Path, ctx: StepContext, global_batch: int) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"cannot read the training state {path}: {err}") from None
        if state["world_size"] != self.dist.world_size or state["global_batch"] != global_batch:
            raise CheckpointError(
                f"{path} was written by {state['world_size']} process(es) with a global batch of "
                f"{state['global_batch']}; resume with the same number of processes and batch size"
            )
        if state["total_steps"] != ctx.total_steps:
            raise CheckpointError(
                f"{path} is a run of {state['total_steps']} steps, this one has {ctx.total_steps}: "
                "resume with the same data, epochs and batch size"
            )
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.stage.load_state_dict(state["stage"])
        _set_rng_state(state["rng"][self.dist.rank])
        self.history = list(state["history"])
        ctx.step = state["step"]
        logger.info("resumed from %s at step %d of %d", path, ctx.step, ctx.total_steps)
