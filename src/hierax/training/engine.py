"""The training engine shared by fine-tuning (`supervised.py`) and DINOv2 pretraining (`dino_v2.py`).

A stage (`stage.py`: the contract, its hooks and `StepContext`) defines its model, its loss and its step; the
engine owns everything else: the data order, the loop, bf16 autocast, gradient accumulation and clipping, the
optimizer and its schedules, model EMA (`ema.py`), checkpoints and exact resume (`checkpoint.py`), the metrics
log and the warning for a run that is not learning (`stuck.py`).

    config = TrainConfig(output_dir=..., epochs=..., batch_size=..., lr=..., ...)   # see the field comments
    dist = init_distributed()            # hierax.distributed: torchrun env; gloo on CPU, nccl on CUDA
    seed_everything(config.seed)         # hierax.distributed: before building the stage (reproducible init)
    history = Engine(stage, config, dist).fit()     # -> list of metric records (also in metrics.jsonl)
    close_distributed(dist)              # leave the process group (no-op in a single process)

Data order: each epoch a permutation seeded by (seed, epoch); micro-batch m of the epoch takes the next
batch_size * world_size positions, rank r the r-th slice, so 1 process with batch 2B and 2 processes with batch
B see the same images per step. Each sample's augmentation runs under a torch RNG seeded by (seed, epoch,
position), so the result does not depend on workers, ranks or resumes. The last incomplete step is dropped.
One DataLoader serves the whole run (loader.RunBatchSampler): its workers fork once, before the first step, and
read ahead across epoch ends.

Files in output_dir: model.pt (stage.export, reference .pt layout: EMA weights when EMA is on),
training_state.pt (raw weights, optimizer, EMA, scaler, stage state, per-rank RNG states, step, history),
metrics.jsonl (one JSON record per log interval and per validation, and the stuck-loss check's), bad_samples.jsonl
(skipped images).
Every file is written to a temporary name and renamed, so a kill leaves the last good version.
`config.resume` continues from training_state.pt exactly: same weights as an uninterrupted run on CPU.
LR: linear warmup then cosine to lr * min_lr_ratio; group "lr_scale" (layer decay) multiplies it. Weight
decay: cosine from weight_decay to weight_decay_end when set; groups with "weight_decay" 0 keep 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from hierax.distributed import DistInfo, init_distributed, seed_everything
from hierax.errors import HieraxError
from hierax.training import optim
from hierax.training.checkpoint import gather_rng_states, read_training_state, set_rng_state
from hierax.training.ema import ModelEMA
from hierax.training.loader import RunBatchSampler, SeededSamples, atomic_torch_save, atomic_write_text, to_device
from hierax.training.stage import Stage, StepContext, TrainConfig
from hierax.training.stuck import StuckLossCheck
from hierax.weights.files import write_checkpoint

__all__ = ["Engine", "ModelEMA", "Stage", "StepContext", "TrainConfig"]

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.jsonl"
BAD_SAMPLES_FILE = "bad_samples.jsonl"


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
        ctx = self._setup(total, steps_per_epoch)
        self._start_or_resume(ctx, per_step)
        train_model = self._wrapped_model()
        logger.info(
            "training %d steps (%d epochs of %d), global batch %d, %d process(es), warmup %d steps",
            total,
            cfg.epochs,
            steps_per_epoch,
            per_step,
            dist.world_size,
            self.warmup,
        )
        stage.on_train_start(ctx)
        batches = iter(self._run_loader(SeededSamples(stage.train_dataset, cfg.max_bad_retries), ctx))
        while ctx.step < total:
            self._run_epoch(train_model, batches, ctx)
        dist.barrier()
        if dist.is_main:
            stage.on_train_end(self.history, ctx)
        return self.history

    # ---- setup ---------------------------------------------------------------------------------------------

    def _setup(self, total: int, steps_per_epoch: int) -> StepContext:
        """Model on its device, EMA, optimizer, precision and schedules; returns the run's context."""
        cfg, dist = self.config, self.dist
        self.module = self.stage.model.to(dist.device)
        if cfg.grad_checkpointing and hasattr(self.module, "set_grad_checkpointing"):
            self.module.set_grad_checkpointing(True)
        self.ema = ModelEMA(self.module) if cfg.ema else None
        groups = self.stage.param_groups(cfg)
        for g in groups:
            g.setdefault("lr_scale", 1.0)
            g["base_weight_decay"] = g.get("weight_decay", cfg.weight_decay)
        self.optimizer = optim.adamw(groups, cfg.lr, cfg.weight_decay)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        amp = cfg.amp if cfg.amp is not None else dist.device.type == "cuda"
        amp_dtype = getattr(torch, cfg.amp_dtype)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=amp and amp_dtype == torch.float16)
        self.warmup = optim.warmup_steps(total, steps_per_epoch, cfg.warmup_epochs)
        self.stuck = StuckLossCheck(self.stage.chance_loss, total)
        self.history: list[dict] = []
        return StepContext(cfg, dist, total, steps_per_epoch, ema=self.ema, amp_enabled=amp, amp_dtype=amp_dtype)

    def _start_or_resume(self, ctx: StepContext, global_batch: int) -> None:
        """Load the saved state under config.resume; refuse to overwrite an earlier run otherwise."""
        cfg = self.config
        state_path = cfg.output_dir / STATE_FILE
        if cfg.resume and state_path.exists():
            self._load_state(state_path, ctx, global_batch)
        elif cfg.resume:
            logger.warning("--resume: no %s in %s, starting from scratch", STATE_FILE, cfg.output_dir)
        elif state_path.exists():
            raise HieraxError(
                f"{cfg.output_dir} holds an earlier run ({STATE_FILE}); pass --resume to continue it "
                "or choose another output directory"
            )
        if self.dist.is_main:
            atomic_write_text(cfg.output_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in self.history))

    def _wrapped_model(self) -> nn.Module:
        """The module the steps call: under DDP when distributed, compiled when asked."""
        model: nn.Module = self.module
        if self.dist.enabled:
            device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(self.module, device_ids=device_ids)
        if self.config.compile:
            model = torch.compile(model)
        return model

    def _run_loader(self, data: SeededSamples, ctx: StepContext) -> DataLoader:
        """This rank's micro-batches from the step the run is at to its end (loader.RunBatchSampler)."""
        cfg, dist = self.config, self.dist
        sampler = RunBatchSampler(
            len(data),
            cfg.batch_size,
            ctx.steps_per_epoch * cfg.accum_steps,
            dist.rank,
            dist.world_size,
            cfg.seed,
            ctx.step * cfg.accum_steps,
            ctx.total_steps * cfg.accum_steps,
        )
        return DataLoader(
            data,
            batch_sampler=sampler,
            num_workers=cfg.num_workers,
            collate_fn=self._collate,
            pin_memory=dist.device.type == "cuda",
            generator=torch.Generator().manual_seed(0),
        )

    def _collate(self, items: list[tuple[Any, list]]) -> tuple[Any, list]:
        return self.stage.collate([s for s, _ in items]), [e for _, skipped in items for e in skipped]

    # ---- the loop ------------------------------------------------------------------------------------------

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

    def _run_epoch(self, train_model: nn.Module, batches: Any, ctx: StepContext) -> None:
        """Optimizer steps to the end of the current epoch from the run's micro-batches, then validation and a
        checkpoint."""
        cfg = self.config
        end = (ctx.epoch + 1) * ctx.steps_per_epoch
        self._sums: dict[str, torch.Tensor] = {}
        self._count, self._images, self._tick = 0, 0, time.perf_counter()
        self.module.train()
        bar = tqdm(
            total=ctx.steps_per_epoch,
            initial=ctx.step % ctx.steps_per_epoch,
            desc=f"epoch {ctx.epoch + 1}",
            disable=not self.dist.is_main,
            leave=False,
            dynamic_ncols=True,
        )
        while ctx.step < end:
            self._step(train_model, batches, ctx)
            bar.update(1)
            if ctx.step % cfg.log_every == 0 or ctx.step == end:
                bar.set_postfix(loss=f"{self._log_train(ctx):.4f}")
            if self.stuck.due(ctx.step):
                self._log(self.stuck.report(float(self.dist.all_reduce_mean(self.stuck.mean())), cfg.lr))
            if ctx.step == end:
                self._validate(ctx)
            if ctx.step == end or (cfg.checkpoint_every and ctx.step % cfg.checkpoint_every == 0):
                self.save(ctx)
        bar.close()

    def _step(self, train_model: nn.Module, batches: Any, ctx: StepContext) -> None:
        """One optimizer step: accumulated micro-batches, clipping, the update, the EMA and the stage's hooks."""
        cfg, dist, stage = self.config, self.dist, self.stage
        self._set_schedules(ctx)
        # forward and backward of each micro-batch; DDP syncs gradients on the last one only
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
                self._add_metric(k, torch.as_tensor(v, dtype=torch.float32).detach() / cfg.accum_steps)
            self.stuck.add(ctx.step, loss.detach().float())
            self._images += cfg.batch_size * dist.world_size
        # the update
        stage.before_optimizer_step(ctx)
        if cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            self._add_metric("grad_norm", torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad).float())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            decay = stage.ema_decay(ctx)
            if decay is None:
                decay = optim.ema_decay_at(ctx.step, ctx.total_steps, cfg.ema_decay)
            self.ema.update(self.module, decay)
        stage.after_optimizer_step(ctx)
        ctx.step += 1
        self._count += 1

    def _add_metric(self, key: str, value: torch.Tensor) -> None:
        value = value.to(self.dist.device)
        self._sums[key] = self._sums[key] + value if key in self._sums else value

    def _log_train(self, ctx: StepContext) -> float:
        """Write the train record of the steps since the last one (means over steps and ranks); returns its loss."""
        record = {
            "split": "train",
            "step": ctx.step,
            "epoch": round(ctx.step / ctx.steps_per_epoch, 4),
            "lr": ctx.lr,
        }
        for k, v in self._sums.items():
            record[k] = float(self.dist.all_reduce_mean(v / self._count))
        record["images_per_s"] = round(self._images / max(time.perf_counter() - self._tick, 1e-9), 2)
        self._log(record)
        if not math.isfinite(record["loss"]):
            raise HieraxError(
                f"the loss is {record['loss']} at step {ctx.step}: lower --lr, or resume from "
                "the last checkpoint with a smaller one"
            )
        self._sums, self._count, self._images, self._tick = {}, 0, 0, time.perf_counter()
        return record["loss"]

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

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def save(self, ctx: StepContext) -> None:
        """Write the model checkpoint and the training state (rank 0; every rank contributes its RNG state)."""
        rng = gather_rng_states(self.dist)
        if self.dist.is_main:
            module = self.ema.module if self.ema is not None else self.module
            exported = self.stage.export(module, ctx)
            if exported is not None:
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
        state = read_training_state(path, self.dist.world_size, global_batch, ctx.total_steps)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.stage.load_state_dict(state["stage"])
        set_rng_state(state["rng"][self.dist.rank])
        self.history = list(state["history"])
        ctx.step = state["step"]
        logger.info("resumed from %s at step %d of %d", path, ctx.step, ctx.total_steps)
