"""Training on real data: scikit-learn's handwritten digits (1,797 real 8x8 grey scans of 10 digits, UCI),
upscaled to 32 px RGB class folders. A small HieraDet learns them from scratch with the default recipe (only data,
network, size, epochs and batch size given), a model trained on digits 0-4 fine-tunes to digits 5-9 with
`init_from`, and a run whose labels are shuffled is reported as stuck while a learning run is not."""

from __future__ import annotations

import json
import logging
import math
import random
import shutil

import pytest
import torch

from hierax.training.engine import TrainConfig
from hierax.training.stuck import StuckLossCheck
from hierax.training.supervised import FineTuneConfig, train_classifier
from tests.train_support import make_digits

# hieradet_d_tiny's layout with one block per stage and width 16: a 0.1 M-parameter network that trains in seconds.
SMALL = {"depths": [1, 1, 1, 1], "embed_dim": 16, "drop_path_rate": 0.0}
SIZE = (32, 32)
# Stated figures (val top-1, 10 classes, chance 0.1): 3 epochs from scratch with the defaults reach at least this.
# Measured 0.953 (Xeon, 1 thread).
SCRATCH_TOP1 = 0.85
# 3 epochs of fine-tuning a digits-0-4 model (defaults: layer decay 0.65, new head) on digits 5-9 (chance 0.2).
# Measured 0.872; the same run from scratch measured 0.944: this toy network's features of five digits do not
# beat a fresh start, so the bar is about fine-tuning learning a new head on real data, not about transfer.
FINETUNE_TOP1 = 0.75
STUCK_LOG = "training looks stuck"


def _train(out, train, val, epochs: int, batch_size: int = 32, **options):
    """A run with only data, network, size, epochs and batch size given (plus the small config for CI time)."""
    if "init_from" not in options:
        options["model_config"] = SMALL
    fine_tune = FineTuneConfig(data=str(train), val=str(val), network="hieradet_d_tiny", size=SIZE, **options)
    config = TrainConfig(output_dir=out, epochs=epochs, batch_size=batch_size, num_workers=0)
    return train_classifier(fine_tune, config)


def _records(out, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


@pytest.mark.slow
def test_a_small_hieradet_learns_real_digits_from_scratch_with_the_defaults(tmp_path, caplog):
    train, val = make_digits(tmp_path / "digits", size=SIZE[0])
    with caplog.at_level(logging.WARNING, logger="hierax.training.stuck"):
        _train(tmp_path / "run", train, val, epochs=3)
    top1 = [r["top1"] for r in _records(tmp_path / "run", "val")]
    assert len(top1) == 3 and top1[-1] >= SCRATCH_TOP1, top1
    assert min(top1) > 0.3  # never near chance, not even after the first epoch
    (check,) = _records(tmp_path / "run", "check")
    assert check["chance_loss"] == pytest.approx(math.log(10)) and check["stuck"] is False
    assert STUCK_LOG not in caplog.text


@pytest.mark.slow
def test_fine_tuning_a_digits_model_on_other_digits(tmp_path, caplog):
    low = make_digits(tmp_path / "low", size=SIZE[0], classes=(0, 1, 2, 3, 4))
    high = make_digits(tmp_path / "high", size=SIZE[0], classes=(5, 6, 7, 8, 9))
    first = _train(tmp_path / "first", *low, epochs=2)
    with caplog.at_level(logging.INFO, logger="hierax.training.supervised"):
        result = _train(tmp_path / "tuned", *high, epochs=3, init_from=str(first.model_path))
    assert "replaced the 5-class head by a new 5-class head" in caplog.text
    assert result.info.class_names == ["5", "6", "7", "8", "9"]
    assert result.info.config == {"depths": [1, 1, 1, 1], "embed_dim": 16}  # the checkpoint's network
    top1 = [r["top1"] for r in _records(tmp_path / "tuned", "val")]
    assert top1[-1] >= FINETUNE_TOP1, top1


@pytest.mark.slow
def test_shuffled_labels_are_reported_as_stuck(tmp_path, caplog):
    train, val = make_digits(tmp_path / "digits", size=SIZE[0], per_class=50)
    files = sorted(train.glob("*/*.png"))
    labels = [f.parent.name for f in files]
    random.Random(0).shuffle(labels)
    shuffled = tmp_path / "shuffled"
    for path, label in zip(files, labels, strict=True):
        (shuffled / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, shuffled / label / path.name)
    with caplog.at_level(logging.WARNING, logger="hierax.training.stuck"):
        _train(tmp_path / "run", shuffled, val, epochs=2, batch_size=8)
    (check,) = _records(tmp_path / "run", "check")
    assert check["stuck"] is True and check["loss"] > 0.95 * math.log(10)
    assert STUCK_LOG in caplog.text and "check that the labels match the images" in caplog.text


def test_the_stuck_check_reads_the_window_before_its_step():
    check = StuckLossCheck(math.log(10), total_steps=100)  # checked after 30 steps, over steps 20-29
    assert (check.window_start, check.check_at) == (20, 30)
    for step in range(30):
        check.add(step, torch.tensor(9.0 if step < 20 else 2.0))
        assert check.due(step + 1) == (step + 1 == 30)
    assert check.mean().item() == pytest.approx(2.0)
    assert check.report(2.0, 5e-4)["stuck"] is False  # 2.0 < 0.95 ln(10)
    assert check.report(2.25, 5e-4)["stuck"] is True
    assert StuckLossCheck(math.log(10), total_steps=50).chance_loss is None  # too short to tell
    assert not StuckLossCheck(None, total_steps=100).due(30)
