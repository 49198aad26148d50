"""DINOv2 self-supervised pretraining of a HieraDet backbone (stage 1 of the published model).

A student (backbone + DINO head + iBOT head + mask token) learns to match an EMA teacher: the DINO loss compares
the pooled embedding of every crop with the teacher's view of the *other* global crops; the iBOT loss compares
the student's stage-4 tokens under block masks with the teacher's unmasked tokens; KoLeo spreads the pooled
features. The shared training engine runs the loop; its model EMA is the teacher.

Adapting DINOv2 to a hierarchical backbone: masks are drawn on the stride-32 grid (one cell per stage-4 token),
upsampled x8 to the stem grid, where a learned mask token replaces the stem output before the position embedding.

Short runs: DINOv2 counts its schedules in iterations (epochs of 1,250): a learning-rate warmup of 12,500, a
teacher temperature warmup of 37,500, momentum 0.992 -> 1 over 125,000. A run of a few hundred steps never gets
informative teacher targets (they stay within 2% of uniform), so the DINO and iBOT losses only pull every image
to one point and KoLeo only spreads them apart: any large backbone step is harm. Such runs therefore keep
DINOv2's teacher momentum (the exported teacher stays near its start), warm the learning rate up over half the
run (`dino_recipe.warmup_epochs`) and have no heads-only phase; the temperature warmup and the frozen
prototypes are capped at 30% and 10% of the run. Runs as long as DINOv2's get its recipe unchanged. With a
k-NN probe (`knn_path`), the starting weights are probed at step 0, the best backbone is kept in model-best.pt
beside the last one (model.pt), and a run that falls below its start says so.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from hierax.data.datasets import ImageDataset, load_labelled
from hierax.data.sources import expand_sources
from hierax.distributed import DistInfo, init_distributed
from hierax.errors import HieraxError
from hierax.training import optim
from hierax.training.dino_data import (
    MultiCropAugmentation,
    collate_multicrop,
    sample_masks,
    stage_grids,
    upsample_mask,
)
from hierax.training.dino_heads import DinoStudent, build_student
from hierax.training.dino_losses import TeacherTargets, dino_loss, ibot_loss, koleo_loss, teacher_entropy
from hierax.training.dino_memory import MemoryEstimate, StudentCost, check_memory, estimate_peak_memory
from hierax.training.dino_monitor import CollapseMonitor, KnnProbe, KnnTracker, feature_spread
from hierax.training.dino_recipe import DinoConfig, DinoSchedule, default_lr, warmup_epochs
from hierax.training.engine import MODEL_FILE, Engine, Stage, StepContext, TrainConfig
from hierax.weights.files import ModelInfo, write_checkpoint

logger = logging.getLogger(__name__)

BEST_FILE = "model-best.pt"  # the backbone with the best k-NN top-1 (with --knn-data), beside the last one


class DinoV2Stage(Stage):
    """The engine stage of DINOv2 pretraining (see the module docstring)."""

    def __init__(
        self,
        network: str,
        train_dataset,
        config: DinoConfig | None = None,
        network_config: dict | None = None,
        rgb_stats: dict | None = None,
        seed: int = 0,
    ) -> None:
        self.network = network
        self.config = config or DinoConfig()
        self.network_config = dict(network_config or {})
        self.rgb_stats = rgb_stats
        self.train_dataset = train_dataset
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the initial weights depend on the seed only, so runs can be compared
            self.model = build_student(network, self.config, **self.network_config)
        self.dino_targets = TeacherTargets(
            self.config.num_prototypes, self.config.targets, self.config.sinkhorn_iterations
        )
        self.ibot_targets = TeacherTargets(
            self.config.ibot_prototypes or self.config.num_prototypes,
            self.config.targets,
            self.config.sinkhorn_iterations,
        )
        self.monitor = CollapseMonitor(self.config.num_prototypes)
        self.probe: KnnProbe | None = None
        self.knn = KnnTracker()
        self._schedule: DinoSchedule | None = None

    def schedule(self, ctx: StepContext) -> DinoSchedule:
        if self._schedule is None:
            self._schedule = DinoSchedule.for_run(self.config, ctx.total_steps, ctx.steps_per_epoch)
            self.dino_targets.to(ctx.device)
            self.ibot_targets.to(ctx.device)
            s = self._schedule
            logger.info(
                "DINOv2 schedules: teacher temperature warmup %d steps, prototypes frozen %d steps, "
                "teacher momentum %.4f -> %.4f",
                s.teacher_temp_warmup_steps,
                s.freeze_last_layer_steps,
                self.config.momentum_start,
                self.config.momentum_end,
            )
        return self._schedule

    def collate(self, samples: list) -> dict:
        return collate_multicrop(samples)

    def param_groups(self, config: TrainConfig) -> list[dict]:
        # the prototypes are normalised in forward: decay would only shrink their norm and inflate their step
        return optim.param_groups(self.model, config.weight_decay, config.layer_decay, extra_no_decay=("prototypes",))

    def masks_for(self, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Stride-32 masks (2B, h, w) and stem-grid token masks. They are drawn for the global batch from a RNG
        seeded by the step, and each rank takes its images' share, so N processes mask as one process would."""
        crops = batch["global"]
        grids = stage_grids(crops.shape[-2], crops.shape[-1], self.model.backbone.config.q_stride)
        rng = random.Random(hash((ctx.config.seed, ctx.step, ctx.micro_step)))
        per_rank, world, rank = crops.shape[0] // 2, ctx.dist.world_size, ctx.dist.rank
        masks = sample_masks(2 * per_rank * world, grids[-1], rng, self.config.mask_probability, self.config.mask_ratio)
        masks = masks.view(2, world, per_rank, *grids[-1])[:, rank].reshape(2 * per_rank, *grids[-1])
        masks = masks.to(crops.device)
        return masks, upsample_mask(masks, 2 ** (len(grids) - 1), grids[0])

    def training_step(self, model: nn.Module, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        cfg, schedule = self.config, self.schedule(ctx)
        self._probe_start(ctx)
        temp = schedule.teacher_temp(ctx.step)
        masks, token_mask = self.masks_for(batch, ctx)
        with torch.no_grad():
            teacher = ctx.ema.module(batch["global"], masks=masks)
            dino_t = self.dino_targets(teacher["global"], temp)
            ibot_t = self.ibot_targets(teacher["patches"], temp)
        student = model(batch["global"], batch.get("local"), token_mask=token_mask, masks=masks)
        # each student global crop is compared with the teacher's other global crop, every local crop with both
        s_views = list(student["global"].chunk(2)) + (
            list(student["local"].chunk(cfg.crops.local_crops)) if "local" in student else []
        )
        l_dino = dino_loss(s_views, list(dino_t.chunk(2)), cfg.student_temp)
        l_ibot = ibot_loss(student["patches"], ibot_t, masks, cfg.student_temp)
        l_koleo = sum(koleo_loss(p) for p in student["pooled"].chunk(2))
        loss = cfg.dino_weight * l_dino + cfg.ibot_weight * l_ibot + cfg.koleo_weight * l_koleo
        spread = feature_spread(teacher["pooled"])
        entropy = teacher_entropy(dino_t)
        if ctx.micro_step == 0 and ctx.step % ctx.config.log_every == 0:  # reading the values syncs a GPU
            self.monitor.check(
                float(spread), float(entropy), after_warmup=ctx.step >= schedule.teacher_temp_warmup_steps
            )
        metrics = {
            "dino_loss": l_dino.detach(),
            "ibot_loss": l_ibot.detach(),
            "koleo_loss": l_koleo.detach(),
            "teacher_entropy": entropy,
            "feature_std": spread,
            "teacher_temp": temp,
            "momentum": schedule.momentum(ctx.step),
        }
        return loss, metrics

    def before_optimizer_step(self, ctx: StepContext) -> None:
        if self.schedule(ctx).last_layer_frozen(ctx.step):
            for head in (self.model.dino_head, self.model.ibot_head):
                for p in head.last_layer_parameters():
                    p.grad = None

    def ema_decay(self, ctx: StepContext) -> float:
        return self.schedule(ctx).momentum(ctx.step)

    def after_optimizer_step(self, ctx: StepContext) -> None:
        every = self.config.knn_every
        if every and (ctx.step + 1) % every == 0 and (ctx.step + 1) % ctx.steps_per_epoch:
            scores = self._knn(ctx.ema.module if ctx.ema else self.model, ctx, ctx.step + 1)
            if scores:
                k = self.knn
                logger.info(
                    "step %d: k-NN top-1 %.4f (student %.4f; start %.4f, best %.4f at step %d)",
                    ctx.step + 1,
                    scores["knn_top1"],
                    scores.get("knn_student", float("nan")),
                    k.start,
                    k.best,
                    k.best_step,
                )

    def _knn(self, teacher: DinoStudent, ctx: StepContext, step: int) -> dict[str, float]:
        """Probe the teacher's backbone and, once it differs from the student's, the student's; the best so far
        is written to model-best.pt (rank 0). Empty without a probe set."""
        if self.config.knn_path is None:
            return {}
        if self.probe is None:
            self.probe = KnnProbe(self.config.knn_path, self.size, self.rgb_stats)
        with torch.autocast(ctx.device.type, enabled=False), torch.no_grad():
            scores = {"knn_top1": self.probe(teacher.backbone, ctx.device)}
            if teacher is not self.model and step > 0:
                scores["knn_student"] = self.probe(self.model.backbone, ctx.device)
        best = self.knn.observe(step, scores["knn_top1"], scores.get("knn_student"))
        if best is not None and ctx.dist.is_main:
            write_checkpoint(
                ctx.output_dir / BEST_FILE, *self.export(teacher if best == "teacher" else self.model, ctx)
            )
        return {**scores, "knn_start": self.knn.start, "knn_best": self.knn.best}

    def _probe_start(self, ctx: StepContext) -> None:
        """The k-NN of the starting weights (the teacher is still the student's copy), once per run."""
        if self.knn.start is None and self.config.knn_path is not None and ctx.step == 0 and ctx.micro_step == 0:
            scores = self._knn(ctx.ema.module if ctx.ema else self.model, ctx, 0)
            logger.info("step 0 (the starting weights): k-NN top-1 %.4f", scores["knn_top1"])

    def validate(self, module: nn.Module, ctx: StepContext) -> dict[str, float]:
        return self._knn(module, ctx, ctx.step)

    def on_train_end(self, history: list[dict], ctx: StepContext) -> None:
        k = self.knn
        if k.start is None:
            return
        logger.info(
            "k-NN top-1: start %.4f, best %.4f (the %s at step %d, %s), last %.4f (%s)",
            k.start,
            k.best,
            k.best_of,
            k.best_step,
            BEST_FILE,
            k.last,
            MODEL_FILE,
        )
        if k.last < k.start:
            logger.warning(
                "the run ended below its starting k-NN (%.4f < %.4f): use %s, the best backbone (k-NN %.4f)",
                k.last,
                k.start,
                BEST_FILE,
                k.best,
            )

    @property
    def size(self) -> tuple[int, int]:
        return (self.config.crops.global_size, self.config.crops.global_size)

    def export(self, module: nn.Module, ctx: StepContext) -> tuple[dict, object]:
        """The teacher's backbone, in the reference .pt layout without a classifier."""
        info = ModelInfo.create(self.network, {}, self.size, self.rgb_stats, config=self.network_config)
        return module.backbone.state_dict(), info

    def state_dict(self) -> dict:
        return {
            "dino_targets": self.dino_targets.state_dict(),
            "ibot_targets": self.ibot_targets.state_dict(),
            "knn": self.knn.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.dino_targets.load_state_dict(state["dino_targets"])
        self.ibot_targets.load_state_dict(state["ibot_targets"])
        self.knn.load_state_dict(state.get("knn", {}))


def unlabelled_paths(data: str | Path) -> list[str]:
    """Every image under a folder (recursively; class folders are just folders), a list/CSV file or a glob; an
    iNat21 annotation .json gives its images. Labels are ignored."""
    data = str(data)
    if data.lower().endswith(".json"):
        return list(load_labelled(data).paths)
    paths = expand_sources(data)
    if not paths:
        raise HieraxError(f"no images found in {data}")
    return paths


def pretrain(
    data: str | Path,
    network: str,
    output_dir: str | Path,
    *,
    size: int = 224,
    local_size: int | None = None,
    local_crops: int = 8,
    epochs: int = 100,
    batch_size: int = 64,
    lr: float | None = None,
    config: DinoConfig | None = None,
    network_config: dict | None = None,
    dist: DistInfo | None = None,
    memory_check: bool = True,
    **train_options,
) -> list[dict]:
    """Pretrain `network` with DINOv2 on the images of `data`; writes output_dir/model.pt (the teacher backbone,
    reference .pt layout, no classifier) and a resumable training_state.pt. Returns the metric history.

    `train_options` are TrainConfig fields (resume, seed, num_workers, accum_steps, amp, log_every, ...).
    Unset, the optimisation follows DINOv2 (AdamW, LR 0.004 x sqrt(batch / 1024), weight decay 0.04 -> 0.2,
    clip 3.0, layer decay 0.9), the warmup of `dino_recipe.warmup_epochs`. Before it starts, the run's peak memory
    is estimated and a run that cannot fit raises HieraxError saying what to change (`memory_check=False`: skip)."""
    config = config or DinoConfig()
    crops = replace(
        config.crops,
        global_size=size,
        local_size=local_size or max(32, round(size * 96 / 224)),
        local_crops=local_crops,
    )
    config = replace(config, crops=crops)
    for name, side in (("size", config.crops.global_size), ("local size", config.crops.local_size)):
        if min(stage_grids(side, side)[-1]) < 1:
            raise HieraxError(f"the {name} {side} is too small: HieraDet needs crops of at least 29 pixels")
    dist = dist if dist is not None else init_distributed(train_options.get("device"))
    augment = MultiCropAugmentation(config.crops)
    dataset = ImageDataset(unlabelled_paths(data), transform=augment)
    global_batch = batch_size * dist.world_size * train_options.get("accum_steps", 1)
    steps_per_epoch = len(dataset) // global_batch
    options = dict(
        lr=lr or default_lr(global_batch),
        min_lr_ratio=0.001,
        weight_decay=0.04,
        weight_decay_end=0.2,
        layer_decay=0.9,
        warmup_epochs=warmup_epochs(epochs, steps_per_epoch),
        clip_grad=3.0,
        ema=True,
    )
    options.update(train_options)
    train_config = TrainConfig(output_dir=Path(output_dir), epochs=epochs, batch_size=batch_size, **options)
    if memory_check:
        check_run_memory(network, config, network_config or {}, train_config, dist)
    stage = DinoV2Stage(network, dataset, config, network_config, seed=train_config.seed)
    return Engine(stage, train_config, dist).fit()


def check_run_memory(
    network: str, config: DinoConfig, network_config: dict, train: TrainConfig, dist: DistInfo
) -> MemoryEstimate:
    """Estimate the run's peak memory (see dino_memory) and stop before it starts if it cannot fit."""
    with torch.device("meta"):
        student = build_student(network, config, **network_config)
    crops = config.crops
    cost = StudentCost.measure(student, crops.global_size, crops.local_size)
    cells = math.prod(stage_grids(crops.global_size, crops.global_size, student.backbone.config.q_stride)[-1])
    masked = 2 * config.mask_probability * sum(config.mask_ratio) / 2 * cells

    def estimate(batch_size: int, grad_checkpointing: bool) -> MemoryEstimate:
        return estimate_peak_memory(
            cost,
            batch_size=batch_size,
            local_crops=crops.local_crops,
            masked_tokens=masked,
            num_workers=train.num_workers,
            grad_checkpointing=grad_checkpointing,
        )

    return check_memory(
        estimate,
        batch_size=train.batch_size,
        accum_steps=train.accum_steps,
        grad_checkpointing=train.grad_checkpointing,
        device=dist.device,
        processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )
