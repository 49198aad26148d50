"""Detection crops: decode each frame once, cut out every selected box, transform each crop for the model.

API:
    CropPolicy(shape="square", context=0.1, edge="pad"), CropPolicy.parse("square:0.1:pad")
        shape   "square": a square around the box's centre whose side is the box's longer side times
                (1 + 2 * context), so the model sees the animal undistorted (hierax models take square inputs);
                "tight": the box itself with `context` of its width / height added on each side (resized to the
                model's input without keeping the aspect ratio).
        context extra border on each side, as a fraction of the box's side (0.1 = 10%).
        edge    "pad": parts of the window outside the frame are filled with the fill colour (the model's mean
                colour, which normalises to zero), so the animal stays centred at the same scale wherever it is;
                "shift": a square window is moved inside the frame when it fits there (only real pixels), and a
                tight one is clipped to the frame.
    crop_window(box, width, height, policy) -> (left, top, right, bottom) in integer pixels (may pass the edges)
    crop_frame(image, box, policy, fill) -> uint8 (3, h, w) crop of a decoded frame
    FrameBoxes(frame, path, boxes) (from hierax.data.boxes): one frame's selected boxes, `boxes` =
        ((detection index, (x, y, w, h)), ...) with MegaDetector's normalised [x_min, y_min, width, height]
    CropDataset(frames, transform, policy=CropPolicy(), fill=(128, 128, 128), *, capture=False, overrides=None)
        -> torch Dataset, one item per frame:
        {"index": int, "frame": int, "path": str, "crops": Tensor (n, ...) | None, "detections": list[int],
         "error": str | None, "capture": dict | None}; a frame that cannot be decoded gives crops=None and
        error=<reason>. A frame without boxes is not decoded (error "no such file" when it is missing).
        With capture=True each frame's header is read once in the worker (`frame_capture`): "capture" =
        {"time": EXIF capture time or None, "context": its CaptureContext} (hierax.data.metadata's
        capture_context with the run-wide `overrides`), for events and a location prior.
        `crop_offsets` numbers the crops 0..num_crops-1 in frame order; `locate(crop_ids)` maps them back to
        (frame, detection) arrays.
    collate_crops(samples) -> the batch dict `hierax.inference.predict.iter_predictions` reads (as
        collate_samples makes): {"images": (N, ...) | None, "labels": -1s (N,), "indices": crop ids (N,),
        "paths": one per crop, "meta": one per crop ({CAPTURE_KEY: its frame's CaptureContext}, {} without
        capture), "errors": [(frame, path, reason)]}, plus "frames" and "detections" (N,) and "captures":
        [(frame, capture)] for every frame of the batch, those without crops included.
    make_crop_loader(dataset, batch_size=16, workers=None) -> DataLoader whose batches hold at most `batch_size`
        crops and `batch_size` frames (whole frames only; a frame with more boxes than that is a batch of its own).

Box pixel edges are rounded once and the window is placed from them with integer arithmetic, so a box around
the same pixels gives the same crop tensor wherever it sits in a frame (with edge="pad", also at the edges).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hierax.data.boxes import Box, FrameBoxes
from hierax.data.datasets import CAPTURE_KEY, PathTable
from hierax.data.images import MAX_PIXELS, MIN_SIDE, decode_image
from hierax.data.metadata import Overrides, capture_context, read_capture
from hierax.errors import HieraxError, ImageDecodeError
from hierax.transforms import normalize_stats

Transform = Callable[[torch.Tensor], torch.Tensor]
SHAPES = ("square", "tight")
EDGES = ("pad", "shift")


@dataclass(frozen=True)
class CropPolicy:
    """How a detection box becomes the crop the classifier sees (see the module docstring)."""

    shape: str = "square"
    context: float = 0.1
    edge: str = "pad"

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise HieraxError(f"unknown crop shape '{self.shape}': use {' or '.join(SHAPES)}")
        if self.edge not in EDGES:
            raise HieraxError(f"unknown crop edge handling '{self.edge}': use {' or '.join(EDGES)}")
        if not (math.isfinite(self.context) and 0 <= self.context <= 2):
            raise HieraxError(f"crop context must be between 0 and 2 (a fraction of the box), got {self.context}")

    @classmethod
    def parse(cls, text: str) -> CropPolicy:
        """'SHAPE[:CONTEXT[:EDGE]]', e.g. 'square', 'tight:0', 'square:0.2:shift' (the --crop flag's value)."""
        parts = [p.strip() for p in text.split(":")]
        if not 1 <= len(parts) <= 3 or not parts[0]:
            raise HieraxError(f"bad crop policy '{text}': use SHAPE[:CONTEXT[:EDGE]], e.g. square:0.1:pad")
        context = cls.context
        if len(parts) > 1:
            try:
                context = float(parts[1])
            except ValueError:
                raise HieraxError(f"bad crop context '{parts[1]}' in '{text}': a number such as 0.1") from None
        return cls(parts[0], context, parts[2] if len(parts) > 2 else cls.edge)

    def __str__(self) -> str:
        return f"{self.shape}:{self.context:g}:{self.edge}"


def box_pixels(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """A normalised (x, y, w, h) box as integer pixel edges inside the frame, at least one pixel wide and high."""
    x, y, w, h = box
    left = min(max(round(x * width), 0), width - 1)
    top = min(max(round(y * height), 0), height - 1)
    right = min(max(round((x + w) * width), left + 1), width)
    bottom = min(max(round((y + h) * height), top + 1), height)
    return left, top, right, bottom


def _shift_inside(start: int, size: int, limit: int) -> int:
    """Move a window of `size` starting at `start` inside [0, limit) when it fits there."""
    return min(max(start, 0), limit - size) if size <= limit else start


def crop_window(box: Box, width: int, height: int, policy: CropPolicy) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) pixel window the policy cuts around `box`; it may pass the frame's edges."""
    left, top, right, bottom = box_pixels(box, width, height)
    bw, bh = right - left, bottom - top
    if policy.shape == "square":
        side = max(1, round(max(bw, bh) * (1 + 2 * policy.context)))
        x0, y0 = left + (bw - side) // 2, top + (bh - side) // 2
        if policy.edge == "shift":
            x0, y0 = _shift_inside(x0, side, width), _shift_inside(y0, side, height)
        return x0, y0, x0 + side, y0 + side
    px, py = round(bw * policy.context), round(bh * policy.context)
    x0, y0, x1, y1 = left - px, top - py, right + px, bottom + py
    if policy.edge == "shift":
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    return x0, y0, x1, y1


def crop_frame(
    image: torch.Tensor, box: Box, policy: CropPolicy, fill: Sequence[int] = (128, 128, 128)
) -> torch.Tensor:
    """The uint8 (3, h, w) crop of a decoded (3, H, W) frame; pixels outside the frame get `fill`."""
    height, width = image.shape[-2:]
    x0, y0, x1, y1 = crop_window(box, width, height, policy)
    if x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height:
        return image[:, y0:y1, x0:x1].contiguous()
    out = torch.tensor(list(fill), dtype=image.dtype).view(3, 1, 1).expand(3, y1 - y0, x1 - x0).contiguous()
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if sx1 > sx0 and sy1 > sy0:
        out[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[:, sy0:sy1, sx0:sx1]
    return out


def fill_from_stats(rgb_stats: dict | None) -> tuple[int, int, int]:
    """The uint8 colour that a model's normalisation maps to zero (its mean), for padding crops."""
    mean = normalize_stats(rgb_stats)["mean"]
    return tuple(int(round(255 * m)) for m in mean)  # type: ignore[return-value]


def frame_capture(path: str, overrides: Overrides | None = None) -> dict:
    """What a frame's header says about when and where it was taken, with the run-wide overrides applied."""
    capture = read_capture(path)
    return {"time": capture.time, "context": capture_context(capture=capture, overrides=overrides)}


class CropDataset(Dataset):
    """One item per frame: the frame is decoded once and every box's crop transformed (see the module docstring)."""

    def __init__(
        self,
        frames: Sequence[FrameBoxes],
        transform: Transform | None = None,
        policy: CropPolicy | None = None,
        fill: Sequence[int] = (128, 128, 128),
        *,
        max_pixels: int = MAX_PIXELS,
        min_side: int = MIN_SIDE,
        capture: bool = False,
        overrides: Overrides | None = None,
    ) -> None:
        frames = list(frames)
        self.capture = capture
        self.overrides = overrides
        self.transform = transform
        self.policy = policy or CropPolicy()
        self.fill = tuple(int(v) for v in fill)
        self.max_pixels = max_pixels
        self.min_side = min_side
        # Compact arrays rather than a list of objects: forked DataLoader workers then share them untouched.
        self.paths = PathTable(f.path for f in frames)
        self.frame_ids = np.array([f.frame for f in frames], dtype=np.int64)
        counts = np.array([len(f.boxes) for f in frames], dtype=np.int64)
        self.crop_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._frame_of = np.repeat(self.frame_ids, counts)
        self._detection_of = np.array([d for f in frames for d, _ in f.boxes], dtype=np.int64)
        self._boxes = np.array([b for f in frames for _, b in f.boxes], dtype=np.float64).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_crops(self) -> int:
        return int(self.crop_offsets[-1])

    def locate(self, crop_ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(frame indices, detection indices) of crop ids, e.g. a BatchResult's `indices`."""
        ids = np.asarray(crop_ids, dtype=np.int64)
        return self._frame_of[ids], self._detection_of[ids]

    def __getitem__(self, index: int) -> dict:
        start, end = self.crop_offsets[index], self.crop_offsets[index + 1]
        path = self.paths[index]
        sample = {
            "index": index,
            "frame": int(self.frame_ids[index]),
            "path": path,
            "crops": None,
            "detections": self._detection_of[start:end].tolist(),
            "error": None,
            "capture": frame_capture(path, self.overrides) if self.capture else None,
        }
        if start == end:
            if not os.path.isfile(path):
                sample["error"] = "no such file"
            return sample
        try:
            image = decode_image(path, max_pixels=self.max_pixels, min_side=self.min_side)
        except ImageDecodeError as err:
            sample["error"] = str(err)
            return sample
        crops = []
        for box in self._boxes[start:end]:
            crop = crop_frame(image, tuple(float(v) for v in box), self.policy, self.fill)
            if self.transform is not None:
                try:
                    crop = self.transform(crop)
                except (RuntimeError, ValueError) as err:
                    sample["error"] = f"transform failed: {err}"
                    return sample
            crops.append(crop)
        sample["crops"] = torch.stack(crops) if crops else None
        return sample


def collate_crops(samples: list[dict], offsets: np.ndarray | None = None) -> dict:
    """Flatten frames into one batch of crops (errors as values, one per failed frame); see the module docstring.

    `offsets` are the dataset's crop_offsets (make_crop_loader passes them); crop ids are offsets[index] + j."""
    good = [s for s in samples if s["error"] is None and s["crops"] is not None]
    ids, frames, detections, paths, meta = [], [], [], [], []
    for s in good:
        n = len(s["detections"])
        start = int(offsets[s["index"]]) if offsets is not None else 0
        ids.extend(range(start, start + n))
        frames.extend([s["frame"]] * n)
        detections.extend(s["detections"])
        paths.extend([s["path"]] * n)
        where = s.get("capture") or {}
        meta.extend(({CAPTURE_KEY: where["context"]} if "context" in where else {}) for _ in range(n))
    return {
        "images": torch.cat([s["crops"] for s in good]) if good else None,
        "labels": torch.full((len(ids),), -1, dtype=torch.long),
        "indices": torch.tensor(ids, dtype=torch.long),
        "frames": torch.tensor(frames, dtype=torch.long),
        "detections": torch.tensor(detections, dtype=torch.long),
        "paths": paths,
        "meta": meta,
        "errors": [(s["frame"], s["path"], s["error"]) for s in samples if s["error"] is not None],
        "captures": [(s["frame"], s.get("capture")) for s in samples],
    }


class CropBatchSampler(Sampler[list[int]]):
    """Consecutive frames grouped so that each batch holds at most `max_crops` crops (at least one frame) and at
    most `max_frames` frames (a run of frames without boxes still spreads over the workers)."""

    def __init__(self, counts: Sequence[int], max_crops: int, max_frames: int | None = None) -> None:
        max_frames = max_crops if max_frames is None else max_frames
        self.batches: list[list[int]] = []
        current: list[int] = []
        total = 0
        for i, n in enumerate(counts):
            if current and (total + n > max_crops or len(current) >= max_frames):
                self.batches.append(current)
                current, total = [], 0
            current.append(i)
            total += n
        if current:
            self.batches.append(current)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _CollateWithOffsets:
    """A picklable collate_fn that knows the dataset's crop numbering (DataLoader workers may be spawned)."""

    def __init__(self, offsets: np.ndarray) -> None:
        self.offsets = offsets

    def __call__(self, samples: list[dict]) -> dict:
        return collate_crops(samples, self.offsets)


def make_crop_loader(
    dataset: CropDataset,
    *,
    batch_size: int = 16,
    workers: int | None = None,
    pin_memory: bool = False,
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """A DataLoader over a CropDataset: decoding and cropping in `workers` processes, at most `batch_size` crops
    per batch, in frame order."""
    if batch_size < 1:
        raise HieraxError("batch_size must be at least 1")
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    counts = np.diff(dataset.crop_offsets)
    return DataLoader(
        dataset,
        batch_sampler=CropBatchSampler(counts.tolist(), batch_size),
        num_workers=workers,
        collate_fn=_CollateWithOffsets(dataset.crop_offsets),
        pin_memory=pin_memory,
        prefetch_factor=2 if workers > 0 else None,
        worker_init_fn=worker_init_fn,
    )


__all__ = [
    "CropBatchSampler",
    "CropDataset",
    "CropPolicy",
    "FrameBoxes",
    "box_pixels",
    "collate_crops",
    "crop_frame",
    "crop_window",
    "fill_from_stats",
    "frame_capture",
    "make_crop_loader",
]
