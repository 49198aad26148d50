"""Detection crops: the same pixels give the same crop (and answer) anywhere in a frame, one decode per frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

import hierax.data.crops as crops_module
from hierax.data.crops import (
    CropDataset,
    CropPolicy,
    FrameBoxes,
    collate_crops,
    crop_frame,
    crop_window,
    fill_from_stats,
    make_crop_loader,
)
from hierax.errors import HieraxError
from hierax.inference.classification import infer_batch
from hierax.models import create_model
from hierax.transforms import classification_transform

from .data_fixtures import TINY_CONFIG

W, H = 640, 480
PATCH = 200  # a real photo patch, larger than any crop window used below
BOX_IN_PATCH = (60, 70, 80, 56)  # x, y, w, h in pixels inside the patch (the cat's face region)


def _patch() -> np.ndarray:
    cat = skdata.chelsea()  # (300, 451, 3) uint8
    return np.ascontiguousarray(cat[40 : 40 + PATCH, 120 : 120 + PATCH])


def _frame(seed: int, at: tuple[int, int], patch: np.ndarray) -> np.ndarray:
    """A noise frame (different for each seed) with the photo patch pasted at (x, y), clipped at the edges."""
    frame = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    x, y = at
    sx0, sy0 = max(0, -x), max(0, -y)
    dx0, dy0 = max(0, x), max(0, y)
    w, h = min(PATCH - sx0, W - dx0), min(PATCH - sy0, H - dy0)
    frame[dy0 : dy0 + h, dx0 : dx0 + w] = patch[sy0 : sy0 + h, sx0 : sx0 + w]
    return frame


def _box(at: tuple[int, int]) -> tuple[float, float, float, float]:
    """The MegaDetector box (normalised) around the same patch pixels when the patch sits at `at`."""
    bx, by, bw, bh = BOX_IN_PATCH
    return ((at[0] + bx) / W, (at[1] + by) / H, bw / W, bh / H)


def _tensor(frame: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frame).permute(2, 0, 1).contiguous()


def test_same_pixels_give_the_same_crop_and_answer_anywhere():
    patch = _patch()
    places = [(10, 20), (300, 150), (437, 275), (123, 7)]
    policy = CropPolicy()  # square, 10% context, pad
    crops = [crop_frame(_tensor(_frame(s, at, patch)), _box(at), policy) for s, at in enumerate(places)]
    assert crops[0].shape == (3, 96, 96)  # longer side 80 px * (1 + 2 * 0.1)
    for crop in crops[1:]:
        assert torch.equal(crop, crops[0])
    transform = classification_transform(64)
    batch = torch.stack([transform(c) for c in crops])
    torch.manual_seed(0)
    net = create_model("hieradet_d_tiny", 7, **TINY_CONFIG).eval()
    probs, _ = infer_batch(net, batch)
    np.testing.assert_allclose(probs[1:], np.repeat(probs[:1], 3, axis=0), atol=1e-6)
    # The crop is centred on the box: its middle is the middle of the box's pixels.
    bx, by, bw, bh = BOX_IN_PATCH
    centre = patch[by + bh // 2, bx + bw // 2]
    np.testing.assert_array_equal(crops[0][:, 48, 48].numpy(), centre)


def test_pad_fills_only_what_lies_outside_the_frame():
    patch = _patch()
    fill = (10, 200, 30)
    inside = crop_frame(_tensor(_frame(0, (100, 100), patch)), _box((100, 100)), CropPolicy(), fill)
    # Move the patch so that the box touches the frame's corner: its window starts 5 px left of the frame and 3 px
    # above it (the context border is 8 px).
    bx, by, bw, bh = BOX_IN_PATCH
    left_of_window = bx + (bw - 96) // 2
    at = (-left_of_window - 5, -(by + (bh - 96) // 2) - 3)
    edge = crop_frame(_tensor(_frame(1, at, patch)), _box(at), CropPolicy(), fill)
    assert edge.shape == inside.shape
    expected = inside.clone()
    expected[:, :, :5] = torch.tensor(fill, dtype=torch.uint8).view(3, 1, 1)
    expected[:, :3, :] = torch.tensor(fill, dtype=torch.uint8).view(3, 1, 1)
    assert torch.equal(edge, expected)


def test_shift_keeps_real_pixels_and_tight_is_the_box():
    frame = _tensor(_frame(3, (0, 0), _patch()))
    box = (0.0, 0.0, 100 / W, 50 / H)
    x0, y0, x1, y1 = crop_window(box, W, H, CropPolicy("square", 0.1, "shift"))
    assert (x0, y0, x1 - x0, y1 - y0) == (0, 0, 120, 120)
    assert torch.equal(crop_frame(frame, box, CropPolicy("square", 0.1, "shift")), frame[:, :120, :120])
    tight = crop_frame(frame, (10 / W, 20 / H, 30 / W, 40 / H), CropPolicy("tight", 0.0))
    assert torch.equal(tight, frame[:, 20:60, 10:40])
    assert crop_window((10 / W, 20 / H, 30 / W, 40 / H), W, H, CropPolicy("tight", 0.5, "pad")) == (-5, 0, 55, 80)
    # A degenerate box still gives a crop of at least one pixel.
    assert crop_frame(frame, (0.5, 0.5, 0.0, 0.0), CropPolicy("tight", 0.0)).shape == (3, 1, 1)


def test_policy_parsing_and_errors():
    assert CropPolicy.parse("square") == CropPolicy()
    assert CropPolicy.parse("tight:0") == CropPolicy("tight", 0.0, "pad")
    assert CropPolicy.parse("square:0.25:shift") == CropPolicy("square", 0.25, "shift")
    assert str(CropPolicy("square", 0.25, "shift")) == "square:0.25:shift"
    for bad in ("round", "square:big", "square:0.1:wrap", "square:-1", "a:b:c:d", ""):
        with pytest.raises(HieraxError):
            CropPolicy.parse(bad)
    assert fill_from_stats({"mean": [0.5, 0.25, 1.0], "std": [1, 1, 1]}) == (128, 64, 255)


def test_one_decode_per_frame_and_errors_as_values(tmp_path, monkeypatch):
    patch = _patch()
    good = tmp_path / "cam1" / "a.png"
    good.parent.mkdir()
    Image.fromarray(_frame(0, (50, 60), patch)).save(good)
    bad = tmp_path / "cam1" / "broken.png"
    bad.write_bytes(b"not an image")
    calls = []
    real_decode = crops_module.decode_image

    def counting_decode(path, **kwargs):
        calls.append(str(path))
        return real_decode(path, **kwargs)

    monkeypatch.setattr(crops_module, "decode_image", counting_decode)
    three = tuple((j, _box((50 + 100 * j, 60))) for j in (0, 2, 3))
    frames = [FrameBoxes(5, str(good), three), FrameBoxes(6, str(bad), ((0, (0.1, 0.1, 0.2, 0.2)),))]
    dataset = CropDataset(frames, classification_transform(64))
    sample = dataset[0]
    assert calls == [str(good)]
    assert sample["crops"].shape == (3, 3, 64, 64) and sample["detections"] == [0, 2, 3]
    failed = dataset[1]
    assert failed["crops"] is None and "not an image" in failed["error"]
    batch = collate_crops([sample, failed], dataset.crop_offsets)
    assert batch["images"].shape == (3, 3, 64, 64)
    assert batch["indices"].tolist() == [0, 1, 2] and batch["paths"] == [str(good)] * 3
    assert batch["frames"].tolist() == [5, 5, 5] and batch["detections"].tolist() == [0, 2, 3]
    assert batch["errors"] == [(6, str(bad), failed["error"])]
    frame_idx, det_idx = dataset.locate([2, 0])
    assert frame_idx.tolist() == [5, 5] and det_idx.tolist() == [3, 0]
    assert dataset.num_crops == 4


def test_loader_batches_whole_frames_up_to_the_crop_budget(tmp_path):
    frames = []
    for i, n in enumerate([3, 3, 1, 5, 2]):
        path = tmp_path / f"f{i}.png"
        Image.fromarray(_frame(i, (0, 0), _patch())).save(path)
        frames.append(FrameBoxes(i, str(path), tuple((j, (0.1 * j / 2, 0.1, 0.1, 0.1)) for j in range(n))))
    dataset = CropDataset(frames, classification_transform(32))
    loader = make_crop_loader(dataset, batch_size=4, workers=1)
    batches = list(loader)
    assert [len(b["paths"]) for b in batches] == [3, 4, 5, 2]  # frames 0 | 1+2 | 3 (alone, over budget) | 4
    ids = torch.cat([b["indices"] for b in batches]).tolist()
    assert ids == list(range(14))
    frame_idx, det_idx = dataset.locate(ids)
    assert frame_idx.tolist() == torch.cat([b["frames"] for b in batches]).tolist()
    assert det_idx.tolist() == torch.cat([b["detections"] for b in batches]).tolist()
