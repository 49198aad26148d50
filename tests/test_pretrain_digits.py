"""Short DINOv2 runs on real scans (scikit-learn's handwritten digits, upscaled to 64 px): the run does not end below
where it started on a k-NN probe, reports the starting k-NN beside every probe, and keeps the best backbone
(model-best.pt) beside the last one (model.pt); a run that makes the features worse says so and keeps its start."""

from __future__ import annotations

import logging

import pytest
import torch

from hierax.training.dino_monitor import KnnProbe
from hierax.training.dino_v2 import BEST_FILE, DinoConfig, build_student, pretrain
from hierax.weights.load import load_pretrained_model
from tests.pretrain_images import write_digits

pytestmark = pytest.mark.usefixtures("one_thread")

NETWORK = "hieradet_d_tiny"
TINY = {"depths": (1, 1, 1, 1), "embed_dim": 16, "drop_path_rate": 0.0}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("digits"), unlabelled=320, labelled_per_class=20)


def _run(digits, out, epochs: int, **options) -> list[dict]:
    pool, labelled = digits
    config = DinoConfig(num_prototypes=256, head_hidden_dim=128, head_bottleneck_dim=64, knn_path=str(labelled))
    return pretrain(
        pool,
        NETWORK,
        out,
        size=64,
        local_size=32,
        local_crops=4,
        epochs=epochs,
        batch_size=16,
        config=config,
        network_config=TINY,
        num_workers=0,
        seed=0,
        **options,
    )


def test_a_short_run_on_real_scans_does_not_end_below_its_start(digits, tmp_path):
    history = _run(digits, tmp_path, epochs=3)
    probes = [r for r in history if r["split"] == "val"]
    assert [r["epoch"] for r in probes] == [1, 2, 3]
    start = probes[0]["knn_start"]
    assert all(r["knn_start"] == start for r in probes)
    teacher, student = [r["knn_top1"] for r in probes], [r["knn_student"] for r in probes]
    print(f"k-NN top-1: start {start:.4f}, teacher {teacher}, student {student}")
    # the exported teacher stays where it started or above (within 2 of the 200 probe images: the probe's step);
    # the student learns (0.76 -> 0.85), and model-best.pt keeps it
    assert teacher[-1] >= start - 0.01
    assert probes[-1]["knn_best"] == max([start, *teacher, *student]) >= start + 0.05
    # both backbones load, and each scores what the run recorded for it
    probe = KnnProbe(str(digits[1]), (64, 64))
    for name, recorded in (("model.pt", probes[-1]["knn_top1"]), (BEST_FILE, probes[-1]["knn_best"])):
        net, info = load_pretrained_model(tmp_path / name)
        assert info.num_classes == 0
        assert probe(net) == pytest.approx(recorded, abs=1e-6), name


def test_a_run_that_makes_the_features_worse_warns_and_keeps_its_starting_backbone(digits, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        history = _run(digits, tmp_path, epochs=1, lr=0.05, clip_grad=None)  # far too high: the features collapse
    probe = [r for r in history if r["split"] == "val"][-1]
    assert probe["knn_top1"] < probe["knn_start"] == probe["knn_best"]
    assert "below the starting weights'" in caplog.text and "ended below its starting k-NN" in caplog.text
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        start = build_student(
            NETWORK, DinoConfig(num_prototypes=256, head_hidden_dim=128, head_bottleneck_dim=64), **TINY
        )
    best, _ = load_pretrained_model(tmp_path / BEST_FILE)
    for key, value in start.backbone.state_dict().items():
        torch.testing.assert_close(best.state_dict()[key], value, msg=key)
