"""Unit tests of the DINOv2 pieces: heads, losses, Sinkhorn-Knopp, KoLeo, masks, multi-crop, k-NN, schedules."""

from __future__ import annotations

import logging
import math
import random

import pytest
import torch

from hierax.models import create_model
from hierax.training.dino_data import (
    MultiCropAugmentation,
    MultiCropConfig,
    block_mask,
    collate_multicrop,
    sample_masks,
    stage_grids,
    upsample_mask,
)
from hierax.training.dino_heads import DINOHead
from hierax.training.dino_losses import (
    SoftmaxCentering,
    dino_loss,
    ibot_loss,
    koleo_loss,
    sinkhorn_knopp,
    soft_cross_entropy,
    teacher_entropy,
)
from hierax.training.dino_monitor import CollapseMonitor, KnnTracker, feature_spread, knn_top1
from hierax.training.dino_v2 import DinoConfig, DinoSchedule, build_student

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dino_head_scores_are_cosines_and_prototypes_are_the_last_layer():
    head = DINOHead(24, num_prototypes=50, hidden_dim=32, bottleneck_dim=8)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(24, 32), (32, 32), (32, 8)]
    x = torch.randn(5, 24)
    scores = head(x)
    assert scores.shape == (5, 50)
    assert scores.abs().max() <= 1.0 + 1e-5
    # scaling the prototypes changes nothing: they are weight-normalised with a fixed gain
    before = head(x)
    with torch.no_grad():
        head.prototypes.mul_(7.0)
    torch.testing.assert_close(head(x), before)
    assert head.last_layer_parameters()[0] is head.prototypes
    assert torch.allclose(head.bottleneck(x).norm(dim=-1), torch.ones(5), atol=1e-5)


def test_sinkhorn_balances_prototypes_and_normalises_samples():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 16, generator=g) + torch.linspace(0, 3, 16)  # prototype 15 dominates
    q = sinkhorn_knopp(logits, temperature=0.5, iterations=3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64))
    plain = torch.softmax(logits / 0.5, dim=1)
    # the dominant prototype's share drops towards the balanced 64 / 16 = 4
    assert plain[:, 15].sum() > 10
    assert (q.sum(dim=0) - 4).abs().max() < (plain.sum(dim=0) - 4).abs().max() / 10
    many = sinkhorn_knopp(logits, temperature=0.1, iterations=50)
    torch.testing.assert_close(many.sum(dim=0), torch.full((16,), 4.0), atol=0.05, rtol=0)


def test_softmax_centering_moves_its_centre_towards_the_teacher_mean():
    centering = SoftmaxCentering(4, momentum=0.5)
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    probs = centering(logits, temperature=1.0)
    torch.testing.assert_close(probs, torch.softmax(logits, dim=1))  # first call: centre was zero
    torch.testing.assert_close(centering.center, torch.tensor([[1.5, 0.0, 0.0, 0.0]]))
    second = centering(logits, temperature=1.0)
    assert second[:, 0].max() < probs[:, 0].min() + 0.2  # the dominant prototype is damped


def test_dino_loss_skips_same_view_pairs_and_averages_the_rest():
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(3, 10, generator=g) for _ in range(3)]  # global 1, global 2, local 1
    t = [torch.softmax(torch.randn(3, 10, generator=g), dim=1) for _ in range(2)]
    expected = sum(soft_cross_entropy(s[i], t[j], 0.1).mean() for i, j in [(0, 1), (1, 0), (2, 0), (2, 1)]) / 4
    torch.testing.assert_close(dino_loss(s, t, 0.1), expected)
    # a student predicting the teacher's targets scores lower than one predicting the opposite
    sharp = [torch.log(t[1]) * 0.1, torch.log(t[0]) * 0.1]
    wrong = [-torch.log(t[1]) * 0.1, -torch.log(t[0]) * 0.1]
    assert dino_loss(sharp, t) < dino_loss(wrong, t)


def test_ibot_loss_weights_each_image_by_its_masked_count():
    masks = torch.zeros(4, 2, 2, dtype=torch.bool)
    masks[0, 0, 0] = True
    masks[1] = True  # 4 tokens
    targets = torch.softmax(torch.randn(5, 6), dim=1)
    student = torch.randn(5, 6)
    per_token = soft_cross_entropy(student, targets, 0.1)
    expected = (per_token[0] + per_token[1:].mean()) / 4  # 4 images in the denominator
    torch.testing.assert_close(ibot_loss(student, targets, masks, 0.1), expected)
    none = torch.zeros(4, 2, 2, dtype=torch.bool)
    assert float(ibot_loss(torch.zeros(0, 6), torch.zeros(0, 6), none)) == 0.0


def test_koleo_prefers_spread_features():
    g = torch.Generator().manual_seed(2)
    spread = torch.randn(32, 8, generator=g)
    clustered = torch.ones(32, 8) + 0.01 * torch.randn(32, 8, generator=g)
    assert koleo_loss(spread) < koleo_loss(clustered) - 2
    spread.requires_grad_(True)
    koleo_loss(spread).backward()
    assert torch.isfinite(spread.grad).all()


def test_teacher_entropy_and_feature_spread_detect_collapse():
    assert float(teacher_entropy(torch.eye(4))) == pytest.approx(0.0, abs=1e-6)
    assert float(teacher_entropy(torch.full((3, 8), 1 / 8))) == pytest.approx(math.log(8), rel=1e-5)
    assert float(feature_spread(torch.randn(256, 16))) > 0.8
    assert float(feature_spread(torch.ones(256, 16) + 1e-4 * torch.randn(256, 16))) < 0.01
    monitor = CollapseMonitor(num_prototypes=8)
    assert monitor.check(0.9, 1.0, after_warmup=True) == []
    warned = monitor.check(0.05, math.log(8), after_warmup=True)
    assert [w.split(":")[0] for w in warned] == ["feature collapse", "uniform collapse"]
    assert monitor.check(0.01, math.log(8), after_warmup=True) == []  # once per kind


def test_block_mask_reaches_its_target_with_rectangles():
    rng = random.Random(0)
    for target in (1, 5, 12, 24):
        mask = block_mask(7, 7, target, rng)
        assert mask.shape == (7, 7)
        assert target * 0.5 <= int(mask.sum()) <= target


def test_sample_masks_masks_half_the_crops_within_the_ratio_range():
    masks = sample_masks(16, (7, 7), random.Random(3), probability=0.5, ratio=(0.1, 0.5))
    counts = masks.flatten(1).sum(dim=1)
    assert int((counts > 0).sum()) == 8
    assert int(counts.max()) <= int(0.5 * 49)
    assert sorted(counts.tolist())[8] >= 1


@pytest.mark.parametrize("height,width", [(64, 64), (70, 100), (96, 40)])
def test_stage_grids_and_upsampled_masks_follow_the_network(height, width):
    net = create_model("hieradet_d_tiny", 0, depths=(1, 1, 1, 1), embed_dim=8)
    x = torch.randn(1, 3, height, width)
    shapes = [tuple(s.shape[1:3]) for s in net.forward_stages(x)]
    grids = stage_grids(height, width)
    assert shapes == grids
    masks = torch.zeros(1, *grids[-1], dtype=torch.bool)
    masks[0, -1, -1] = True
    token_mask = upsample_mask(masks, 8, grids[0])
    assert token_mask.shape == (1, *grids[0])
    assert int(token_mask.sum()) == 64
    rows, cols = torch.nonzero(token_mask[0], as_tuple=True)
    assert int(rows.min()) // 8 == grids[-1][0] - 1 and int(cols.min()) // 8 == grids[-1][1] - 1
    # masked stem tokens are replaced by the mask token before the position embedding
    token = torch.randn(8)
    embedded = net.patch_embed(x, token_mask=token_mask, mask_token=token)
    pos = net.position_embedding(*grids[0])[0]
    torch.testing.assert_close(embedded[0][token_mask[0]], token + pos[token_mask[0]])
    torch.testing.assert_close(embedded[0][~token_mask[0]], (net.stem(x) + pos)[0][~token_mask[0]])


def test_multicrop_gives_normalised_crops_reproducible_under_a_seed():
    aug = MultiCropAugmentation(MultiCropConfig(global_size=48, local_size=24, local_crops=3))
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    torch.manual_seed(5)
    crops = aug(image)
    assert [tuple(c.shape) for c in crops] == [(3, 48, 48)] * 2 + [(3, 24, 24)] * 3
    assert all(c.dtype == torch.float32 for c in crops)
    torch.manual_seed(5)
    again = aug(image)
    for a, b in zip(crops, again, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(crops[2], crops[3])


def test_collate_multicrop_is_crop_major_and_reports_failures():
    def sample(i, error=None):
        crops = (
            None
            if error
            else [torch.full((3, 4, 4), float(10 * i + c)) for c in range(2)]
            + [torch.full((3, 2, 2), float(10 * i + c)) for c in range(2, 4)]
        )
        return {"index": i, "path": f"p{i}", "image": crops, "label": -1, "error": error}

    batch = collate_multicrop([sample(0), sample(1, "truncated"), sample(2)])
    assert batch["global"].shape == (4, 3, 4, 4) and batch["local"].shape == (4, 3, 2, 2)
    assert batch["global"][:, 0, 0, 0].tolist() == [0.0, 20.0, 1.0, 21.0]
    assert batch["local"][:, 0, 0, 0].tolist() == [2.0, 22.0, 3.0, 23.0]
    assert batch["errors"] == [(1, "p1", "truncated")]


def test_knn_top1_on_separable_and_random_features():
    g = torch.Generator().manual_seed(4)
    centres = torch.randn(3, 16, generator=g) * 5
    labels = torch.arange(3).repeat_interleave(10)
    feats = centres[labels] + torch.randn(30, 16, generator=g)
    assert knn_top1(feats, labels, k=5) == 1.0
    queries = centres[labels] + torch.randn(30, 16, generator=g)
    assert knn_top1(feats, labels, queries, labels, k=5) == 1.0
    noise = torch.randn(30, 16, generator=g)
    assert knn_top1(noise, labels, k=5) < 0.7


def test_knn_tracker_keeps_the_start_and_the_best_and_warns_once_on_falling_below_the_start(caplog):
    tracker = KnnTracker()
    assert tracker.summary() == {}
    with caplog.at_level(logging.WARNING):
        assert tracker.observe(0, 0.70) == "teacher"  # the starting weights are the first best
        assert tracker.observe(44, 0.72, student=0.74) == "student"
        assert tracker.observe(88, 0.74, student=0.73) is None  # a tie keeps the earlier backbone
        assert caplog.text == ""
        assert tracker.observe(132, 0.65, student=0.60) is None
        assert tracker.observe(176, 0.60) is None  # still below: no second warning
        assert tracker.observe(200, float("nan"), student=0.9) is None  # an unreadable probe changes nothing
    assert caplog.text.count("below the starting weights' 0.7000") == 1
    assert "k-NN 0.7400, step 44" in caplog.text
    assert tracker.summary() == {"knn_start": 0.70, "knn_best": 0.74, "knn_last": 0.60}
    assert (tracker.best_of, tracker.best_step) == ("student", 44)
    resumed = KnnTracker()
    resumed.load_state_dict(tracker.state_dict())
    assert (resumed.best_step, resumed.best_of, resumed.last_step) == (44, "student", 176)
    assert resumed.summary() == tracker.summary()


def test_schedules_adapt_their_warmups_to_the_run_length_and_keep_dinov2s_teacher_momentum():
    cfg = DinoConfig()
    short = DinoSchedule.for_run(cfg, total_steps=30, steps_per_epoch=10)  # a 3-epoch run
    assert short.teacher_temp_warmup_steps == 9
    assert short.teacher_temp(0) == pytest.approx(0.04) and short.teacher_temp(9) == pytest.approx(0.07)
    assert short.freeze_last_layer_steps == 3
    # a short run's teacher moves as slowly as DINOv2's: it stays near the starting weights
    assert short.momentum(0) == pytest.approx(0.992)
    assert short.momentum(29) == pytest.approx(1.0)
    long = DinoSchedule.for_run(cfg, total_steps=100 * 1000, steps_per_epoch=1000)
    assert long.teacher_temp_warmup_steps == 30 * 1000 and long.freeze_last_layer_steps == 1000
    assert long.momentum(0) == pytest.approx(0.992)
    assert long.momentum(50_000) == pytest.approx(0.996, abs=1e-4)


def test_student_forward_gives_every_head_output():
    cfg = DinoConfig(num_prototypes=32, head_hidden_dim=16, head_bottleneck_dim=8)
    student = build_student("hieradet_d_tiny", cfg, depths=(1, 1, 1, 1), embed_dim=8)
    crops = torch.randn(4, 3, 64, 64)
    local = torch.randn(6, 3, 32, 32)
    masks = torch.zeros(4, 2, 2, dtype=torch.bool)
    masks[0, 0, 1] = masks[2, 1, :] = True
    out = student(crops, local, token_mask=upsample_mask(masks, 8, (16, 16)), masks=masks)
    assert out["global"].shape == (4, 32) and out["local"].shape == (6, 32)
    assert out["patches"].shape == (3, 32) and out["pooled"].shape == (4, 64)
    loss = out["global"].sum() + out["local"].sum() + out["patches"].sum()
    loss.backward()
    assert student.mask_token.grad is not None and student.mask_token.grad.abs().sum() > 0
