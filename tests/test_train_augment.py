"""Augmentation scaled to the run's length, and the initialisation a from-scratch run starts from."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from hierax.errors import HieraxError
from hierax.models import create_model
from hierax.training.augment import auto_mix_prob, auto_strength, training_transform
from tests.conftest import TINY


def _image() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=generator)


def test_strength_and_mixing_grow_with_the_run():
    assert [auto_strength(e) for e in (1, 5, 100, 300)] == [0.0, 0.0, 1.0, 1.0]
    assert auto_strength(30) == pytest.approx(25 / 95)
    assert [auto_mix_prob(e) for e in (10, 20, 100, 300)] == [0.0, 0.0, 1.0, 1.0]
    assert auto_mix_prob(30) == pytest.approx(0.125)


def test_strength_zero_only_resizes_and_flips_only_when_asked():
    image = _image()
    torch.manual_seed(0)
    plain = training_transform((32, 32), strength=0.0)
    outputs = [plain(image) for _ in range(12)]
    assert all(out.shape == (3, 32, 32) and torch.equal(out, outputs[0]) for out in outputs)
    flipping = training_transform((32, 32), strength=0.0, hflip=True)
    outputs = [flipping(image) for _ in range(12)]
    assert all(torch.equal(out, outputs[0]) or torch.equal(out, outputs[0].flip(-1)) for out in outputs)
    assert any(not torch.equal(out, outputs[0]) for out in outputs)  # flips happen
    mild = training_transform((32, 32), strength=0.1, min_crop=1.0, random_erasing=0.0, augment="none")
    assert any(isinstance(t, v2.RandomHorizontalFlip) for t in mild.transforms)
    unflipped = training_transform((32, 32), strength=1.0, hflip=False)
    assert not any(isinstance(t, v2.RandomHorizontalFlip) for t in unflipped.transforms)


def test_full_strength_changes_more_than_flips():
    image = _image()
    full = training_transform((32, 32), strength=1.0, random_erasing=0.0)
    torch.manual_seed(0)
    first = full(image)
    distinct = [
        out
        for out in (full(image) for _ in range(8))
        if not (torch.equal(out, first) or torch.equal(out, first.flip(-1)))
    ]
    assert len(distinct) >= 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strength": 1.5}, "strength must be within"),
        ({"strength": -0.1}, "strength must be within"),
        ({"min_crop": 0.0}, "smallest crop share"),
        ({"augment": "autoaugment"}, "unknown augmentation"),
    ],
)
def test_bad_augmentation_settings_are_refused(kwargs, message):
    with pytest.raises(HieraxError, match=message):
        training_transform((32, 32), **kwargs)


def test_blocks_keep_fan_in_init_the_classifier_starts_small_and_pretraining_uses_vit_init():
    torch.manual_seed(0)
    model = create_model("hieradet_d_tiny", num_classes=1000, **TINY)
    qkv = model.body[0][0].attn.qkv.weight  # fan-in 16: PyTorch's default std is 1 / sqrt(3 * 16) = 0.144
    assert qkv.std().item() == pytest.approx((3 * 16) ** -0.5, rel=0.15)
    assert model.classifier.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert model.classifier.bias.abs().max().item() == 0.0
    model.init_linear_layers()  # DINOv2's scheme, used by pretraining from scratch
    assert qkv.std().item() == pytest.approx(0.02, rel=0.15)
    assert model.body[0][0].attn.qkv.bias.abs().max().item() == 0.0
    model.reset_classifier(7)
    assert model.classifier.weight.shape == (7, model.embedding_size)
    assert model.classifier.weight.std().item() == pytest.approx(0.02, rel=0.3)
