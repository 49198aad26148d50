"""Fitting a presence prior: SINR's "assume negative, full" loss with pseudo-negatives, in a small dedicated loop.

Loss (Cole et al. 2023, "assume negative, full"), for a batch of B observations (x_i, y_i), B background points
r_i drawn uniformly over the globe and the year, C species, sigma the logistic function:

    L = 1/(B C) sum_i [ pos_weight * -log sigma(f(x_i)_{y_i})          the observed species is present
                        + sum_{j != y_i} -log(1 - sigma(f(x_i)_j))     the others are assumed absent there
                        + sum_j -log(1 - sigma(f(r_i)_j)) ]            and everything is assumed absent at r_i

At the optimum the presence of species j at x is pos_weight * rho_j / (pos_weight * rho_j + rho + u): it ranks
species like p(j | x) does and saturates towards 1 wherever a species is seen at all (a range map), while
places without records are pulled to 0 by the background term. pos_weight defaults to SINR's 2048, capped at
twice the number of species (the count of negative terms one observation brings: C - 1 species at its place and
C at its background point). SINR chose 2048 for 47,375 species, where it is far below that cap; with few
species 2048 makes every species near its records saturate at presence 1, and which of them is likelier there
is learnt slowly (generated world, 32 species, 10 epochs: prior top-1 0.648 at 64, 0.563 at 2048).

With many species the two negative sums are the cost: (2B x C) logits per step. `species_per_step` bounds it:
every species present in the batch keeps its exact terms, and a uniform sample of the others stands for the
rest, scaled by (others / sample), so the loss and its gradient stay unbiased. None (or a sample at least as
large as the rest) is the exact full loss.

Why not the training engine: it is built around image datasets (per-sample loading in DataLoader workers,
per-sample augmentation seeds, a run folder with model.pt). Here a batch is an index into five in-memory arrays
plus freshly drawn background points, and the output is one file; the loop below reuses the engine's schedule
(`hierax.training.optim`) and seeding (`hierax.distributed`). Exact resume: every random draw comes from
generators seeded by (seed, epoch) or (seed, step), so the state file only needs the weights, the optimizer and
the step.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from hierax.atomic import atomic_write
from hierax.distributed import seed_everything
from hierax.errors import CheckpointError, HieraxError
from hierax.geo.annotations import Records
from hierax.geo.encoding import encode, num_features, random_points
from hierax.geo.model import GeoPrior, PresenceNet
from hierax.training.optim import cosine_factor, warmup_steps

logger = logging.getLogger(__name__)
SINR_POS_WEIGHT = 2048.0


@dataclass
class FitConfig:
    """Hyper-parameters of a fit. Defaults: SINR's network width and depth, its positive weight (capped for
    small species counts, see the module docstring) and batch size."""

    epochs: int = 10
    batch_size: int = 2048  # observations per step (plus as many background points)
    lr: float = 1e-3  # AdamW peak; linear warmup over 5% of the steps, then cosine down to lr * min_lr_ratio
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.0
    hidden: int = 256
    blocks: int = 4  # residual blocks of two Linear layers each
    dropout: float = 0.0
    pos_weight: float | None = None  # None: min(2048, 2 x species with records)
    species_per_step: int | None = 2048  # sampled absent species per step (None: all; exact full loss)
    use_date: bool = True
    seed: int = 0
    checkpoint_every: int = 500  # steps between training-state saves (0: epoch ends only)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise HieraxError("epochs and batch size must be at least 1")
        if self.species_per_step is not None and self.species_per_step < 1:
            raise HieraxError("species per step must be at least 1 (or None for all)")

    def hyperparameters(self) -> dict:
        """What determines the weights (everything but the checkpoint interval)."""
        return {k: v for k, v in asdict(self).items() if k != "checkpoint_every"}


def presence_loss(
    features: torch.Tensor,
    head: nn.Linear,
    targets: torch.Tensor,
    pos_weight: float,
    species_per_step: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The assume-negative-full loss (module docstring) from the network features of B observations followed by
    B background points (2B, H), the head, and the observations' output indices (B,)."""
    b, c = len(targets), head.out_features
    present = torch.zeros(c, dtype=torch.bool)
    present[targets] = True
    others = torch.nonzero(~present).squeeze(1)
    if species_per_step is None or species_per_step >= len(others):
        logits = head(features)
        negatives = F.softplus(logits).sum()
        observed = logits[torch.arange(b), targets]
    else:
        labels = torch.nonzero(present).squeeze(1)
        sample = others[torch.randperm(len(others), generator=generator)[:species_per_step]]
        columns = torch.cat([labels, sample])
        logits = F.linear(features, head.weight[columns], head.bias[columns])
        per_column = F.softplus(logits).sum(dim=0)
        negatives = per_column[: len(labels)].sum() + per_column[len(labels) :].sum() * (len(others) / len(sample))
        observed = logits[torch.arange(b), torch.searchsorted(labels, targets)]
    positives = (pos_weight * F.softplus(-observed) - F.softplus(observed)).sum()
    return (negatives + positives) / (b * c)


def state_path_for(output: str | Path) -> Path:
    """The training-state file kept beside the prior while a fit runs (prior.safetensors -> prior.state.pt)."""
    output = Path(output)
    return output.with_name(output.stem + ".state.pt")


class PriorFitter:
    """The fit's state and one optimizer step at a time (`fit_prior` drives it; benchmarks time it)."""

    def __init__(self, records: Records, config: FitConfig) -> None:
        self.records, self.config = records, config
        self.columns = np.unique(records.label)  # model class of each network output
        self.targets = torch.from_numpy(np.searchsorted(self.columns, records.label))
        self.lat = torch.from_numpy(np.ascontiguousarray(records.lat, dtype=np.float32))
        self.lon = torch.from_numpy(np.ascontiguousarray(records.lon, dtype=np.float32))
        self.day = torch.from_numpy(np.nan_to_num(np.asarray(records.day, dtype=np.float32)))
        self.batch = min(config.batch_size, len(records))
        self.steps_per_epoch = len(records) // self.batch
        self.total = self.steps_per_epoch * config.epochs
        self.warmup = warmup_steps(self.total, self.steps_per_epoch, None)
        self.pos_weight = config.pos_weight or min(SINR_POS_WEIGHT, 2.0 * len(self.columns))
        seed_everything(config.seed)
        self.net = PresenceNet(
            num_features(config.use_date), len(self.columns), config.hidden, config.blocks, config.dropout
        )
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self._order: tuple[int, torch.Tensor] | None = None

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            g = torch.Generator().manual_seed(self.config.seed * 100_003 + self.epoch)
            self._order = (self.epoch, torch.randperm(len(self.records), generator=g))
        return self._order[1]

    def train_step(self) -> float:
        """One optimizer step; returns its loss."""
        cfg = self.config
        position = (self.step % self.steps_per_epoch) * self.batch
        idx = self._epoch_order()[position : position + self.batch]
        step_seed = cfg.seed * 1_000_003 + self.step + 1
        g = torch.Generator().manual_seed(step_seed)
        bg_lat, bg_lon, bg_day = random_points(self.batch, g)
        if cfg.use_date:
            x = torch.cat([encode(self.lat[idx], self.lon[idx], self.day[idx]), encode(bg_lat, bg_lon, bg_day)])
        else:
            x = torch.cat([encode(self.lat[idx], self.lon[idx]), encode(bg_lat, bg_lon)])
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * cosine_factor(self.step, self.total, self.warmup, cfg.min_lr_ratio)
        self.net.train()
        with torch.random.fork_rng(devices=[], enabled=cfg.dropout > 0):
            torch.manual_seed(step_seed)  # dropout's draws, without touching the caller's random state
            features = self.net.features(x)
        loss = presence_loss(features, self.net.head, self.targets[idx], self.pos_weight, cfg.species_per_step, g)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    @cached_property
    def fingerprint(self) -> str:
        """A digest of the records, so that a resume refuses other data."""
        digest = hashlib.sha256()
        for array in (self.records.lat, self.records.lon, self.records.day, self.records.label):
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update("\n".join(self.records.class_names).encode())
        return digest.hexdigest()

    def save_state(self, path: Path) -> None:
        state = {
            "step": self.step,
            "total_steps": self.total,
            "hyperparameters": self.config.hyperparameters(),
            "fingerprint": self.fingerprint,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    def load_state(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"cannot read the fit state {path}: {err}") from None
        if state.get("hyperparameters") != self.config.hyperparameters():
            raise CheckpointError(f"{path} was written with other options; resume with the same ones, or delete it")
        if state.get("fingerprint") != self.fingerprint or state.get("total_steps") != self.total:
            raise CheckpointError(f"{path} was written for other records or classes; resume on the same data")
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        logger.info("resumed the fit from %s at step %d of %d", path, self.step, self.total)

    def prior(self, summary: dict | None = None, source_model: str = "") -> GeoPrior:
        """The prior as it stands (a copy of the network, so that fitting can go on)."""
        net = PresenceNet(num_features(self.config.use_date), len(self.columns), self.config.hidden, self.config.blocks)
        net.load_state_dict(self.net.state_dict())
        hyper = {**self.config.hyperparameters(), "batch_size": self.batch, "pos_weight": self.pos_weight}
        return GeoPrior(
            net,
            list(self.records.class_names),
            self.columns,
            self.config.use_date,
            hyper,
            dict(summary or {}),
            source_model,
            dict(self.records.common_names),
        )


def fit_prior(
    records: Records,
    config: FitConfig,
    output: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    summary: dict | None = None,
    source_model: str = "",
) -> GeoPrior:
    """Fit a prior on `records` and write it to `output` (atomically, after every epoch and at the end).
    A state file beside it (`state_path_for`) is saved every config.checkpoint_every steps and at epoch ends
    and removed when the fit completes; `resume=True` continues from it exactly (same weights as a run that was
    never stopped)."""
    output = Path(output)
    state_path = state_path_for(output)
    fitter = PriorFitter(records, config)
    if resume and state_path.exists():
        fitter.load_state(state_path)
    elif resume:
        logger.warning("--resume: no %s, starting from scratch", state_path)
    elif state_path.exists():
        raise HieraxError(f"{state_path} holds an unfinished fit: pass --resume to continue it, or delete it")
    logger.info(
        "fitting %d outputs on %d records: %d epochs of %d steps, batch %d",
        len(fitter.columns),
        len(records),
        config.epochs,
        fitter.steps_per_epoch,
        fitter.batch,
    )
    bar = tqdm(total=fitter.total, initial=fitter.step, desc="geoprior", disable=not progress, dynamic_ncols=True)
    info = dict(summary or {})
    while fitter.step < fitter.total:
        loss = fitter.train_step()
        bar.update(1)
        if not math.isfinite(loss):
            raise HieraxError(f"the loss is {loss} at step {fitter.step}: lower --lr")
        if fitter.step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.4g}", epoch=fitter.epoch + 1)
        info["final_loss"] = loss
        if fitter.step % fitter.steps_per_epoch == 0 and fitter.step < fitter.total:
            fitter.prior(info, source_model).save(output)
            fitter.save_state(state_path)
        elif config.checkpoint_every and fitter.step % config.checkpoint_every == 0:
            fitter.save_state(state_path)
    bar.close()
    prior = fitter.prior(info, source_model)
    prior.save(output)
    state_path.unlink(missing_ok=True)
    return prior
