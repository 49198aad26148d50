"""Fine-tuning (the model's supervised stage) on the shared engine: `train_classifier(FineTuneConfig, TrainConfig)`.

The recipe of the published model as defaults: AdamW, layer-wise LR decay 0.65 over the blocks when starting from
pretrained weights (none from scratch), no weight decay on norms, biases and position embeddings, warmup then
cosine, label smoothing 0.1, MixUp/CutMix, TrivialAugment (or RandAugment) with random resized crop and random
erasing, scaled to the run's length (`augment.auto_strength`, `augment.auto_mix_prob`: a 10-epoch run is barely
augmented, a 100-epoch one gets the full recipe), model EMA saved as the model, bf16 autocast on CUDA.
`linear_probe` freezes everything but the classifier.

`init_from` takes a registry name, a hierax / reference checkpoint or a SAM 2 / timm file. The head is kept when
its classes are the training set's, otherwise replaced (and logged). Progressive resolution is a second run at a
larger size initialised from the first run's model.pt; the written signature follows `size`.
Outputs in output_dir: model.pt (reference .pt layout, EMA weights, class_to_idx of the training data),
training_state.pt, metrics.jsonl (train records and per-epoch val top-1/top-5), curves.png, bad_samples.jsonl.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from hierax.data.datasets import ImageDataset, LabelledData, collate_samples, load_labelled
from hierax.distributed import close_distributed, init_distributed, seed_everything
from hierax.errors import CheckpointError, HieraxError
from hierax.inference.metrics import topk_correct
from hierax.models import HieraDet, create_model
from hierax.models.hieradet import HieraDetConfig
from hierax.training import optim
from hierax.training.augment import AUGMENTS, BatchMix, auto_mix_prob, auto_strength, training_transform
from hierax.training.curves import plot_curves
from hierax.training.engine import Engine, Stage, StepContext, TrainConfig
from hierax.training.loader import StandingLoader
from hierax.transforms import classification_transform, normalize_stats
from hierax.weights.files import ModelInfo, read_checkpoint
from hierax.weights.load import build_from_state, resolve_file

logger = logging.getLogger(__name__)
_CONFIG_FIELDS = set(HieraDetConfig.__dataclass_fields__)
PRETRAINED_LAYER_DECAY = 0.65


@dataclass
class FineTuneConfig:
    """What the supervised stage needs beyond the engine's TrainConfig."""

    data: str
    val: str | None = None
    data_root: str | None = None
    network: str | None = None  # None: the init checkpoint's network, else hieradet_d_small
    init_from: str | None = None
    size: tuple[int, int] = (256, 256)
    model_config: dict = field(default_factory=dict)  # HieraDetConfig overrides (e.g. drop_path_rate)
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    augment: str = "trivialaugment"
    augment_strength: float | None = None  # None: augment.auto_strength(epochs)
    mix_prob: float | None = None  # None: augment.auto_mix_prob(epochs)
    min_crop: float | None = None  # None: from the strength
    random_erasing: float | None = None  # None: from the strength
    hflip: bool | None = None  # horizontal flips; None: whenever the augmentation strength is above 0
    linear_probe: bool = False

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTS:
            raise HieraxError(f"unknown augmentation '{self.augment}': choose one of {', '.join(AUGMENTS)}")


def _model_config(overrides: dict) -> dict:
    unknown = sorted(set(overrides) - _CONFIG_FIELDS)
    if unknown:
        raise HieraxError(f"unknown HieraDet config field(s): {', '.join(unknown)}")
    return dict(overrides)


def _saved_config(config: dict) -> dict:
    """The config written with the model: architecture only (drop path is a training setting)."""
    return {k: v for k, v in config.items() if k != "drop_path_rate"}


def build_model(
    network: str | None, class_to_idx: dict[str, int], init_from: str | None = None, config: dict | None = None
) -> tuple[HieraDet, str, dict, dict]:
    """The network to fine-tune: (model, network, config overrides, rgb_stats). With `init_from`, its weights are
    loaded (`weights.load.build_from_state`); the classifier is kept only when its classes equal `class_to_idx`,
    otherwise a new one is added."""
    overrides = _model_config(config or {})
    num_classes = len(class_to_idx)
    if init_from is None:
        network = network or "hieradet_d_small"
        return create_model(network, num_classes, **overrides), network, _saved_config(overrides), normalize_stats(None)

    path, entry = resolve_file(init_from)
    state, info = read_checkpoint(path, network=network or (entry.network if entry else None))
    network = network or info.network
    saved = {k: v for k, v in {**(entry.config if entry else {}), **info.config}.items() if k in _CONFIG_FIELDS}
    merged = {**saved, **overrides}
    head = state.get("classifier.weight")
    head_fits = head is not None and info.class_to_idx == class_to_idx and head.shape[0] == num_classes
    if head is not None and not head_fits:
        logger.info(
            "init from %s: replaced the %d-class head by a new %d-class head", path.name, head.shape[0], num_classes
        )
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    elif head is None:
        logger.info("init from %s (a backbone): added a new %d-class head", path.name, num_classes)
    try:
        model = build_from_state(state, replace(info, network=network, config=merged))
    except (CheckpointError, RuntimeError) as err:
        raise CheckpointError(f"{path}: {err}; pass the matching --network") from None
    if not head_fits:
        model.reset_classifier(num_classes)
    logger.info("initialised %s from %s", network, path)
    return model, network, _saved_config(merged), info.rgb_stats


def label_smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross entropy of `logits` against per-sample class distributions `targets` (B, C), one-hot or mixed by
    MixUp/CutMix, after label smoothing towards the uniform distribution."""
    if smoothing > 0:
        targets = targets * (1.0 - smoothing) + smoothing / targets.shape[1]
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=1), dim=1).mean()


class SupervisedStage(Stage):
    """Image classification: a HieraDet with a classifier, label-smoothed cross entropy, mixed batches and top-k
    validation."""

    def __init__(self, options: FineTuneConfig, train: LabelledData, val: LabelledData | None, epochs: int) -> None:
        self.options = options
        self.class_to_idx = dict(train.class_to_idx)
        model_config = dict(options.model_config)
        if options.linear_probe:
            model_config.setdefault("drop_path_rate", 0.0)  # a frozen body needs no stochastic depth
        model, self.network, self.model_config, self.rgb_stats = build_model(
            options.network, self.class_to_idx, options.init_from, model_config
        )
        if options.linear_probe:
            model.requires_grad_(False)
            model.classifier.requires_grad_(True)
        self.model = model
        self.chance_loss = math.log(len(self.class_to_idx))  # a model that predicts the uniform distribution
        size = tuple(options.size)
        strength = options.augment_strength if options.augment_strength is not None else auto_strength(epochs)
        erasing = 0.0 if options.linear_probe else options.random_erasing
        train_tf = training_transform(
            size, self.rgb_stats, options.augment, strength, options.min_crop, erasing, hflip=options.hflip
        )
        self.train_dataset = ImageDataset.from_labelled(train, train_tf)
        eval_tf = classification_transform(size, self.rgb_stats)
        self.val_dataset = ImageDataset.from_labelled(val, eval_tf) if val is not None else None
        self.val_loader: StandingLoader | None = None
        prob = options.mix_prob if options.mix_prob is not None else auto_mix_prob(epochs)
        prob = 0.0 if options.linear_probe else prob
        self.mix = BatchMix(len(self.class_to_idx), options.mixup, options.cutmix, prob)
        flips = options.hflip if options.hflip is not None else strength > 0
        logger.info(
            "%s %s on %d images, %d classes, at %dx%d; augmentation strength %.2f, flips %s, mixed batches: %.0f%%",
            "fine-tuning" if options.init_from else "training from scratch",
            self.network,
            len(train),
            len(self.class_to_idx),
            size[0],
            size[1],
            strength,
            "on" if flips else "off",
            100 * self.mix.prob,
        )

    def info(self) -> ModelInfo:
        """The ModelInfo written with the model: training classes, this run's size, rgb stats and config."""
        return ModelInfo.create(
            self.network, self.class_to_idx, tuple(self.options.size), self.rgb_stats, self.model_config
        )

    def param_groups(self, config: TrainConfig) -> list[dict]:
        return optim.param_groups(self.model, config.weight_decay, config.layer_decay or 1.0)

    def training_step(self, model: nn.Module, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        images, labels = batch["images"], batch["labels"]
        images, targets = self.mix(images, labels)
        logits = model(images)
        loss = label_smoothed_cross_entropy(logits, targets, self.options.label_smoothing)
        acc = (logits.detach().argmax(1) == targets.argmax(1)).float().mean()
        return loss, {"train_top1": acc}

    def on_train_start(self, ctx: StepContext) -> None:
        if self.val_dataset is not None:
            dist = ctx.dist
            shard = Subset(self.val_dataset, range(dist.rank, len(self.val_dataset), dist.world_size))
            self.val_loader = StandingLoader(shard, ctx.config.batch_size * 2, ctx.config.num_workers, collate_samples)
            self.val_loader.start()

    def validate(self, module: nn.Module, ctx: StepContext) -> dict[str, float]:
        if self.val_dataset is None:
            return {}
        if self.val_loader is None:
            self.on_train_start(ctx)
        dist = ctx.dist
        sums = torch.zeros(5, dtype=torch.float64, device=ctx.device)  # top1, top5, loss, images, bad
        k = min(5, len(self.class_to_idx))
        for batch in self.val_loader:
            sums[4] += len(batch["errors"])
            if batch["images"] is None:
                continue
            images, labels = batch["images"].to(ctx.device), batch["labels"].to(ctx.device)
            with ctx.autocast():
                logits = module(images).float()
            correct1, correct5 = topk_correct(logits.topk(k, dim=1).indices, labels)
            sums[0] += correct1.sum()
            sums[1] += correct5.sum()
            sums[2] += F.cross_entropy(logits, labels, reduction="sum")
            sums[3] += len(labels)
        sums = dist.all_reduce_sum(sums)
        n = max(sums[3].item(), 1.0)
        out = {
            "top1": sums[0].item() / n,
            "top5": sums[1].item() / n,
            "val_loss": sums[2].item() / n,
            "images": int(sums[3].item()),
        }
        if sums[4] > 0:
            out["bad_images"] = int(sums[4].item())
        return out

    def export(self, module: nn.Module, ctx: StepContext) -> tuple[dict, ModelInfo]:
        return module.state_dict(), self.info()

    def on_train_end(self, history: list[dict], ctx: StepContext) -> None:
        plot_curves(history, ctx.output_dir / "curves.png")


@dataclass
class TrainResult:
    """Where a fine-tuning run wrote its model, and its metric history."""

    model_path: Path
    history: list[dict]
    info: ModelInfo


def train_classifier(options: FineTuneConfig, config: TrainConfig) -> TrainResult:
    """Fine-tune (or train from scratch) a classifier on a labelled dataset; see the module docstring."""
    dist = init_distributed(config.device)
    train = load_labelled(options.data, root=options.data_root)
    val = load_labelled(options.val, root=options.data_root, class_to_idx=train.class_to_idx) if options.val else None
    if config.layer_decay is None:
        config.layer_decay = PRETRAINED_LAYER_DECAY if options.init_from and not options.linear_probe else 1.0
    seed_everything(config.seed)
    stage = SupervisedStage(options, train, val, config.epochs)
    try:
        history = Engine(stage, config, dist).fit()
    finally:
        close_distributed(dist)
    return TrainResult(config.output_dir / "model.pt", history, stage.info())
