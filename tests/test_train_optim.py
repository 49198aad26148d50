"""Parameter groups (layer decay, no weight decay), schedules and the engine's data order."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from hierax.errors import HieraxError
from hierax.models import create_model, fastpath
from hierax.training import optim
from hierax.training.ema import ModelEMA
from hierax.training.loader import EpochBatchSampler, RunBatchSampler, SeededSamples, StandingLoader
from tests.conftest import TINY


def _tiny(num_classes: int = 3) -> nn.Module:
    return create_model("hieradet_d_tiny", num_classes, depths=(1, 2, 1, 1), embed_dim=16)


def test_layer_decay_follows_the_blocks_and_norms_get_no_weight_decay():
    net = _tiny()
    groups = optim.param_groups(net, weight_decay=0.05, layer_decay=0.5)
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    wd = {name: g["weight_decay"] for g in groups for name in g["names"]}
    assert set(scale) == {n for n, _ in net.named_parameters()}
    top = 6  # 5 blocks + 1
    assert scale["classifier.weight"] == scale["features.0.weight"] == 1.0
    assert scale["body.stage4.0.attn.qkv.weight"] == 0.5
    assert scale["body.stage2.1.mlp.0.weight"] == 0.5 ** (top - 3)
    assert scale["body.stage1.0.norm1.weight"] == 0.5 ** (top - 1)
    assert scale["stem.proj.weight"] == scale["pos_embed"] == scale["pos_embed_win"] == 0.5**top
    assert wd["body.stage3.0.attn.qkv.weight"] == wd["classifier.weight"] == wd["stem.proj.weight"] == 0.05
    for name in ("pos_embed", "pos_embed_win", "classifier.bias", "body.stage2.0.norm1.weight", "features.0.bias"):
        assert wd[name] == 0.0, name


def test_groups_skip_frozen_parameters_and_find_blocks_under_a_prefix():
    wrapper = nn.Module()
    wrapper.backbone = _tiny(0)
    wrapper.head = nn.Linear(16, 4)
    wrapper.backbone.body.stage1.requires_grad_(False)
    groups = optim.param_groups(wrapper, 0.1, 0.9)
    names = {n for g in groups for n in g["names"]}
    assert not any(n.startswith("backbone.body.stage1.") for n in names)
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    assert scale["head.weight"] == 1.0 and scale["backbone.stem.proj.weight"] == pytest.approx(0.9**6)
    assert scale["backbone.body.stage2.0.proj.weight"] == pytest.approx(0.9**4)


def test_schedules_scale_to_the_run():
    assert optim.warmup_steps(10_000, 100, None) == 500  # 5% of a long run
    assert optim.warmup_steps(1000, 100, None) == 100  # at least 100 steps ...
    assert optim.warmup_steps(220, 44, None) == 44  # ... or 20% of a short run
    assert optim.warmup_steps(10, 5, 3) == 5  # never more than half of the run
    factors = [optim.cosine_factor(s, 100, 10, 0.01) for s in range(100)]
    assert factors[0] < factors[5] < factors[9] <= 1.0
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.01, abs=1e-3)
    assert optim.cosine_value(0, 50, 0.04, 0.2) == pytest.approx(0.04)
    assert optim.cosine_value(49, 50, 0.04, 0.2) == pytest.approx(0.2)
    # EMA time constant: 2% of the run, capped at 10,000 steps
    assert optim.auto_ema_decay(500) == pytest.approx(0.9)
    assert optim.auto_ema_decay(10**8) == pytest.approx(0.9999)
    assert optim.auto_ema_decay(20) == 0.0
    assert optim.ema_decay_at(0, 10**6) == pytest.approx(0.1)
    assert optim.ema_decay_at(0, 10**6, 0.5) == pytest.approx(0.1)
    assert optim.ema_decay_at(10**5, 10**6) == pytest.approx(0.9999)


def test_ema_of_a_short_run_tracks_the_model():
    net = nn.Linear(2, 1)
    ema = ModelEMA(net)
    total = 250
    with torch.no_grad():
        for step in range(total):
            net.weight.fill_(step / total)
            ema.update(net, optim.ema_decay_at(step, total))
    # an EMA with a fixed decay of 0.9999 would still sit near 0 after 250 steps
    assert ema.module.weight.mean().item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.skipif(
    torch.bfloat16 not in fastpath.onednn_linear_dtypes(), reason="this CPU keeps no bf16 casts (no native bf16)"
)
def test_ema_update_drops_the_casts_an_evaluation_kept():
    """An evaluation of the EMA model under bf16 autocast keeps packed casts of its Linear weights; the next update
    changes those weights, so it drops the casts rather than hold them through the training steps that follow."""
    net = _tiny()
    ema = ModelEMA(net)
    layers = [m for m in ema.module.modules() if isinstance(m, fastpath.Linear)]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            ema.module(torch.randn(1, 3, 32, 32))
    assert all(fastpath._CAST_WEIGHTS[m][torch.bfloat16][1] is not None for m in layers), "kept by the evaluation"
    ema.update(net, 0.5)
    assert not any(m in fastpath._CAST_WEIGHTS for m in layers)


def test_data_order_is_shared_between_one_and_two_processes():
    def positions(world: int, batch: int, start: int = 0) -> list[list[tuple[int, int]]]:
        per_rank = [list(EpochBatchSampler(40, batch, 5, r, world, seed=3, epoch=1, start=start)) for r in range(world)]
        return [sum((per_rank[r][m] for r in range(world)), []) for m in range(len(per_rank[0]))]

    single, double = positions(1, 8), positions(2, 4)
    assert single == double
    assert sorted(i for batch in single for i, _ in batch) == list(range(40))
    assert positions(1, 8, start=3) == single[3:]
    other_epoch = list(EpochBatchSampler(40, 8, 5, 0, 1, seed=3, epoch=2))
    assert other_epoch != single


def test_the_run_order_is_the_epochs_orders_one_after_another():
    epochs = [list(EpochBatchSampler(40, 4, 5, 1, 2, seed=3, epoch=e)) for e in range(4)]
    whole = RunBatchSampler(40, 4, 5, 1, 2, seed=3, start=0, end=20)
    assert list(whole) == sum(epochs, []) and len(whole) == 20
    resumed = RunBatchSampler(40, 4, 5, 1, 2, seed=3, start=7, end=18)
    assert list(resumed) == sum(epochs, [])[7:18] and len(resumed) == 11


class ReadLog(torch.utils.data.Dataset):
    """Five items (index, reading process); every read is appended to a file."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int) -> torch.Tensor:
        with open(self.log, "a", encoding="utf-8") as fh:
            fh.write(f"{i}\n")
        return torch.tensor([i, os.getpid()])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_standing_loader_forks_once_and_reads_only_when_asked(tmp_path, workers):
    log = tmp_path / "reads.txt"
    loader = StandingLoader(ReadLog(log), 2, workers, torch.stack)
    before = len(multiprocessing.active_children())
    loader.start()
    assert len(multiprocessing.active_children()) == before + workers
    assert not log.exists()  # the empty pass started the workers and read nothing
    passes = [torch.cat(list(loader)) for _ in range(3)]
    assert all(p[:, 0].tolist() == [0, 1, 2, 3, 4] for p in passes)
    pids = {int(pid) for p in passes for pid in p[:, 1]}
    assert len(pids) == 1 and (os.getpid() in pids) == (workers == 0)
    assert len(log.read_text().split()) == 15


class Noisy(torch.utils.data.Dataset):
    """Four random samples; the indices in `bad` are unreadable."""

    def __init__(self, bad: set[int]) -> None:
        self.bad = bad

    def __len__(self):
        return 4

    def __getitem__(self, i):
        error = "truncated image" if i in self.bad else None
        return {"index": i, "path": f"img{i}", "image": torch.rand(3), "error": error}


def test_seeded_samples_are_reproducible_and_replace_bad_ones():
    data = SeededSamples(Noisy({1}))
    a, skipped_a = data[(0, 123)]
    b, _ = data[(0, 123)]
    assert torch.equal(a["image"], b["image"]) and skipped_a == []
    replaced, skipped = data[(1, 7)]
    assert replaced["error"] is None and skipped[0] == (1, "img1", "truncated image")
    assert all(s == (1, "img1", "truncated image") for s in skipped)
    assert data[(1, 7)][0]["index"] == replaced["index"]
    with pytest.raises(HieraxError, match="4 samples in a row failed"):
        SeededSamples(Noisy({0, 1, 2, 3}), max_retries=3)[(0, 1)]


def test_adamw_is_fused_on_cpu_and_steps_as_the_unfused_one():
    torch.manual_seed(0)
    nets = [create_model("hieradet_d_tiny", 5, **TINY) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = []
    for net, make in zip(nets, (optim.adamw, lambda g, lr, wd: torch.optim.AdamW(g, lr=lr, weight_decay=wd))):
        groups = optim.param_groups(net, 0.5, 0.65)
        opts.append(make([{**g, "lr": 0.1 * g["lr_scale"]} for g in groups], 0.1, 0.5))  # large: decay shows
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"]
    nets[0](torch.randn(4, 3, 32, 32)).square().mean().backward()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        b.grad = a.grad.clone()
    for _ in range(3):  # the same gradients each step: any gap is the update's own
        for opt in opts:
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (
        optim.adamw([{"params": [torch.nn.Parameter(torch.ones(2, device="meta"))]}], 1e-3, 0.0).defaults["fused"]
        is None
    )  # other devices keep torch's default
