"""The engine on an in-memory stage: gradient accumulation and gradient checkpointing give the plain run's
weights, one set of loader workers serves every epoch, checkpoint writes are atomic, and a resumed run needs the
same global batch."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from hierax.distributed import seed_everything
from hierax.errors import CheckpointError
from hierax.models import create_model
from hierax.training.engine import Engine, Stage, TrainConfig
from hierax.training.loader import atomic_torch_save


class Blobs(Dataset):
    """Images whose mean brightness encodes the label, with a per-sample random jitter (seeded by the engine)."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict:
        label = i % 4
        image = torch.full((3, 32, 32), label / 4.0) + 0.1 * torch.randn(3, 32, 32)
        return {"index": i, "path": f"blob{i}", "image": image, "label": label, "error": None}


class BlobStage(Stage):
    def __init__(self, checkpointing: bool = False) -> None:
        self.model = create_model("hieradet_d_tiny", 4, depths=(1, 1, 1, 1), embed_dim=16, drop_path_rate=0.0)
        self.model.set_grad_checkpointing(checkpointing)
        self.train_dataset = Blobs()

    def training_step(self, model, batch, ctx):
        logits = model(batch["images"])
        return F.cross_entropy(logits, batch["labels"]), {}


def _run(tmp_path, name: str, checkpointing: bool = False, **overrides) -> dict:
    seed_everything(0)
    stage = BlobStage(checkpointing)
    config = TrainConfig(
        output_dir=tmp_path / name,
        **{"epochs": 1, "batch_size": 8, "lr": 2e-3, "num_workers": 0, "ema_decay": 0.5, **overrides},
    )
    Engine(stage, config).fit()
    return torch.load(tmp_path / name / "training_state.pt", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _logits(state: dict) -> torch.Tensor:
    """The model's outputs on fixed inputs. Compared instead of weights where a parameter's true gradient is zero
    (the attention key bias cancels in the softmax), so AdamW turns rounding noise into full-size steps."""
    model = create_model("hieradet_d_tiny", 4, depths=(1, 1, 1, 1), embed_dim=16)
    model.load_state_dict(state)
    torch.manual_seed(0)
    images = torch.stack([Blobs()[i]["image"] for i in range(8)])
    with torch.no_grad():
        return model.eval()(images)


def test_accumulation_and_checkpointing_match_the_plain_run(tmp_path):
    plain = _run(tmp_path, "plain")
    accumulated = _run(tmp_path, "accum", batch_size=4, accum_steps=2)
    recomputed = _run(tmp_path, "ckpt", checkpointing=True)
    assert plain["step"] == accumulated["step"] == 4
    assert (_logits(plain["model"]) - _logits(accumulated["model"])).abs().max().item() < 1e-5
    assert _max_diff(plain["model"], recomputed["model"]) < 1e-6
    assert _max_diff(plain["model"], plain["ema"]) > 0  # the EMA is a real average, not a copy
    with pytest.raises(CheckpointError, match="same number of processes and batch size"):
        _run(tmp_path, "plain", batch_size=4, resume=True)


def test_atomic_save_keeps_the_last_good_file(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"step": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        atomic_torch_save({"step": 2, "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


class PidBlobs(Blobs):
    """Blobs that also say which process read them."""

    def __getitem__(self, i: int) -> dict:
        return {**super().__getitem__(i), "pid": os.getpid()}


class PidStage(BlobStage):
    """Records the reading processes of every batch, and the step at which the stage was told training starts."""

    def __init__(self) -> None:
        super().__init__()
        self.train_dataset = PidBlobs()
        self.pids: list[int] = []
        self.started_at: list[int] = []

    def collate(self, samples):
        return {
            "images": torch.stack([s["image"] for s in samples]),
            "labels": torch.tensor([s["label"] for s in samples]),
            "pids": torch.tensor([s["pid"] for s in samples]),
        }

    def on_train_start(self, ctx):
        self.started_at.append(ctx.step)

    def training_step(self, model, batch, ctx):
        self.pids += batch["pids"].tolist()
        return super().training_step(model, batch, ctx)


def test_one_set_of_loader_workers_serves_every_epoch(tmp_path):
    def run(name: str, workers: int) -> tuple[PidStage, dict]:
        seed_everything(0)
        stage = PidStage()
        config = TrainConfig(output_dir=tmp_path / name, epochs=3, batch_size=8, lr=2e-3, num_workers=workers)
        Engine(stage, config).fit()
        return stage, torch.load(tmp_path / name / "training_state.pt", weights_only=True)

    forked, forked_state = run("workers", 2)
    inline, inline_state = run("inline", 0)
    assert forked.started_at == inline.started_at == [0]
    assert len(forked.pids) == len(inline.pids) == 3 * 32
    assert set(inline.pids) == {os.getpid()}
    assert os.getpid() not in forked.pids and len(set(forked.pids)) == 2  # forked once, not once an epoch
    assert forked_state["step"] == 12
    assert _max_diff(forked_state["model"], inline_state["model"]) < 1e-6  # the workers change no sample
