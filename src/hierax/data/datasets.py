"""Labelled and unlabelled image datasets that never raise on a bad photo.

API:
    load_labelled(path, *, root=None, class_to_idx=None) -> LabelledData
        `path` is auto-detected:
        - a folder of class folders (`<path>/<class name>/**/<image>`); classes are the sorted folder names;
        - an iNat21 annotation `.json` (COCO-like `images`, `annotations`, `categories`); image `file_name`s are
          relative to `root` (default: the JSON's folder); class names are the categories' `image_dir_name`
          (`00000_Animalia_..._Corvus_corax`) or `name`, sorted; common names come along when present;
        - a `.csv` of `path,label` (header optional; paths relative to `root`, default the CSV's folder).
        With `class_to_idx` (a model's), labels are mapped onto it and unknown class names raise HieraxError.
    LabelledData: .paths (sequence of str), .labels (int64 array), .class_to_idx, .class_names, .common_names
    ImageDataset(paths, transform=None, labels=None, meta=None, capture=None) -> torch Dataset of dict samples:
        {"index": int, "path": str, "image": Tensor | None, "label": int (-1 when unlabelled), "error": str | None,
         "meta": dict (what the sources know about the image, e.g. per-row list columns; {} when nothing)}
        Decoding (`hierax.data.images.decode_image`) and `transform` (e.g. the resize and normalisation of
        `hierax.transforms.classification_transform`) run in the DataLoader workers. A file that cannot be decoded
        gives image=None and error=<reason> instead of an exception. `ImageDataset.from_labelled(data, transform)`.
        With `capture` (a `hierax.data.metadata.Overrides`, empty for none), each decoded sample's meta also holds
        "capture": the `CaptureContext` (where and when it was taken) from the overrides, the meta row's
        latitude/longitude/date columns and the file's EXIF, read from the same bytes as the pixels.
    collate_samples(samples) -> dict batch for DataLoader(collate_fn=collate_samples):
        {"images": Tensor (N, ...) | None, "labels": LongTensor (N,), "indices": LongTensor (N,),
         "paths": list[str] (N), "meta": list[dict] (N), "errors": list[(index, path, reason)]} where N counts the
         good samples only.
    default_workers() -> int: the number of decoding processes a job uses unless told (predict, train, ...).

Paths are kept in a compact `PathTable` (one UTF-8 buffer plus offsets) so that DataLoader workers do not copy
millions of Python strings on access.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from hierax.data.images import IMAGE_EXTENSIONS, MAX_PIXELS, MIN_SIDE, decode_image, read_bytes
from hierax.data.metadata import CaptureContext, Overrides, capture_context
from hierax.data.sources import is_image_path
from hierax.errors import HieraxError, ImageDecodeError

logger = logging.getLogger(__name__)

Sample = dict
Transform = Callable[[torch.Tensor], torch.Tensor]
CAPTURE_KEY = "capture"  # the meta entry holding a sample's CaptureContext


class PathTable(Sequence[str]):
    """An immutable sequence of strings stored as one UTF-8 byte array plus offsets (fork-friendly, compact)."""

    def __init__(self, paths: Iterable[str]) -> None:
        encoded = [os.fspath(p).encode("utf-8", "surrogateescape") for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._buffer[start:end].tobytes().decode("utf-8", "surrogateescape")


@dataclass
class LabelledData:
    """Image paths with integer labels and the class mapping they refer to."""

    paths: Sequence[str]
    labels: np.ndarray
    class_to_idx: dict[str, int]
    common_names: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def class_names(self) -> list[str]:
        """Class names in index order."""
        return [name for name, _ in sorted(self.class_to_idx.items(), key=lambda kv: kv[1])]

    @property
    def num_classes(self) -> int:
        return len(self.class_to_idx)


def _finish(
    paths: list[str], names: list[str], classes: list[str], class_to_idx: dict[str, int] | None, common: dict
) -> LabelledData:
    """Map per-sample class names to indices (the given mapping, else sorted `classes`) and pack the result."""
    mapping = dict(class_to_idx) if class_to_idx is not None else {c: i for i, c in enumerate(sorted(set(classes)))}
    unknown = sorted({n for n in names if n not in mapping})
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise HieraxError(f"{len(unknown)} dataset class(es) are not among the model's classes: {shown}")
    labels = np.fromiter((mapping[n] for n in names), dtype=np.int64, count=len(names))
    logger.info("dataset: %d images, %d classes", len(paths), len(set(names)))
    return LabelledData(PathTable(paths), labels, mapping, common)


def _load_class_folders(root: str, class_to_idx: dict[str, int] | None) -> LabelledData:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise HieraxError(f"{root} has no class folders: expected <root>/<class name>/<images>")
    paths: list[str] = []
    names: list[str] = []
    for name in classes:
        found = []
        for folder, dirs, files in os.walk(os.path.join(root, name), followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.extend(os.path.join(folder, f) for f in files if not f.startswith(".") and is_image_path(f))
        if not found:
            logger.warning("class folder %s has no images", name)
        found.sort()
        paths.extend(found)
        names.extend([name] * len(found))
    return _finish(paths, names, classes, class_to_idx, {})


def _load_inat_json(json_path: str, root: str | None, class_to_idx: dict[str, int] | None) -> LabelledData:
    try:
        with open(json_path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise HieraxError(f"cannot read the annotation file {json_path}: {err}") from None
    if not all(k in doc for k in ("images", "annotations", "categories")):
        raise HieraxError(f"{json_path} is not an iNat21 annotation file (needs images, annotations, categories)")
    root = root if root is not None else os.path.dirname(json_path)
    cat_name = {c["id"]: c.get("image_dir_name") or c["name"] for c in doc["categories"]}
    common = {cat_name[c["id"]]: c["common_name"] for c in doc["categories"] if c.get("common_name")}
    label_of = {a["image_id"]: a["category_id"] for a in doc["annotations"]}
    paths: list[str] = []
    names: list[str] = []
    for image in doc["images"]:
        if image["id"] not in label_of:
            continue
        paths.append(os.path.join(root, image["file_name"]))
        names.append(cat_name[label_of[image["id"]]])
    return _finish(paths, names, list(cat_name.values()), class_to_idx, common)


def _load_csv(csv_path: str, root: str | None, class_to_idx: dict[str, int] | None) -> LabelledData:
    root = root if root is not None else os.path.dirname(csv_path)
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as fh:
            rows = [r for r in csv.reader(fh) if r and not r[0].lstrip().startswith("#")]
    except OSError as err:
        raise HieraxError(f"cannot read {csv_path}: {err.strerror or err}") from None
    path_col, label_col = 0, 1
    if rows:
        header = [c.strip().lower() for c in rows[0]]
        if "path" in header and "label" in header:
            path_col, label_col = header.index("path"), header.index("label")
            rows = rows[1:]
    bad = [i for i, r in enumerate(rows) if len(r) <= max(path_col, label_col)]
    if bad:
        raise HieraxError(f"{csv_path}: row {bad[0] + 1} does not have a path and a label")
    paths = [os.path.join(root, r[path_col].strip()) for r in rows]
    names = [r[label_col].strip() for r in rows]
    return _finish(paths, names, names, class_to_idx, {})


def load_labelled(
    path: str | os.PathLike, *, root: str | os.PathLike | None = None, class_to_idx: dict[str, int] | None = None
) -> LabelledData:
    """Load a class-folder tree, an iNat21 annotation JSON or a `path,label` CSV (see the module docstring)."""
    path = os.fspath(path)
    root = os.fspath(root) if root is not None else None
    if os.path.isdir(path):
        return _load_class_folders(path, class_to_idx)
    if not os.path.isfile(path):
        raise HieraxError(f"no such dataset: {path} (expected a class-folder tree, an iNat21 .json or a .csv)")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".json":
        return _load_inat_json(path, root, class_to_idx)
    if suffix == ".csv":
        return _load_csv(path, root, class_to_idx)
    raise HieraxError(f"unknown dataset format {path}: use a folder of class folders, an iNat21 .json or a .csv")


def default_workers() -> int:
    """Decoding processes per job unless told: min(4, the CPUs this process may use, shared among the torchrun
    ranks of this machine), at least 1. More workers than CPUs only preempt the model's threads."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cpus = os.cpu_count() or 1
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(4, cpus // ranks_here))


class ImageDataset(Dataset):
    """Decode + transform one image per item; failures come back as values (see the module docstring)."""

    def __init__(
        self,
        paths: Sequence[str] | Iterable[str],
        transform: Transform | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        *,
        meta: Sequence[Mapping] | None = None,
        capture: Overrides | None = None,
        max_pixels: int = MAX_PIXELS,
        min_side: int = MIN_SIDE,
    ) -> None:
        self.paths = paths if isinstance(paths, PathTable) else PathTable(paths)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if self.labels is not None and len(self.labels) != len(self.paths):
            raise HieraxError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        self.meta = meta
        if meta is not None and len(meta) != len(self.paths):
            raise HieraxError(f"{len(self.paths)} paths but {len(meta)} metadata rows")
        self.capture = capture
        self.transform = transform
        self.max_pixels = max_pixels
        self.min_side = min_side

    @classmethod
    def from_labelled(cls, data: LabelledData, transform: Transform | None = None, **kwargs) -> ImageDataset:
        """The dataset over a LabelledData's paths and labels."""
        return cls(data.paths, transform, data.labels, **kwargs)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        path = self.paths[index]
        label = int(self.labels[index]) if self.labels is not None else -1
        meta = dict(self.meta[index]) if self.meta is not None else {}
        sample: Sample = {"index": index, "path": path, "image": None, "label": label, "error": None, "meta": meta}
        try:
            data = read_bytes(path)  # read once: the pixels and the EXIF come from these bytes
            image = decode_image(data, max_pixels=self.max_pixels, min_side=self.min_side)
        except ImageDecodeError as err:
            sample["error"] = str(err)
            return sample
        if self.capture is not None:
            meta[CAPTURE_KEY] = _capture(data, meta, self.capture)
        if self.transform is not None:
            try:
                image = self.transform(image)
            except (RuntimeError, ValueError) as err:
                sample["error"] = f"transform failed: {err}"
                return sample
        sample["image"] = image
        return sample


def _capture(data: bytes, row: Mapping, overrides: Overrides) -> CaptureContext:
    """capture_context for one decoded file. It never raises on the metadata it knows; anything else its
    parsers meet in a file's EXIF costs the image its place and time, never its prediction. Pillow's warnings
    about corrupt EXIF are muted: a GPS block it cannot read is reported as a broken location instead."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return capture_context(data, row, overrides)
    except Exception as err:  # metadata must not fail a batch job (see the docstring)
        fallback = capture_context(None, row, overrides)
        return replace(fallback, warnings=(*fallback.warnings, f"EXIF unreadable ({type(err).__name__}: {err})"))


def collate_samples(samples: list[Sample]) -> dict:
    """Stack the good samples of a batch; carry the failed ones along as (index, path, reason)."""
    good = [s for s in samples if s["error"] is None]
    return {
        "images": torch.stack([s["image"] for s in good]) if good else None,
        "labels": torch.tensor([s["label"] for s in good], dtype=torch.long),
        "indices": torch.tensor([s["index"] for s in good], dtype=torch.long),
        "paths": [s["path"] for s in good],
        "meta": [s.get("meta", {}) for s in good],
        "errors": [(s["index"], s["path"], s["error"]) for s in samples if s["error"] is not None],
    }


__all__ = [
    "CAPTURE_KEY",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "LabelledData",
    "PathTable",
    "collate_samples",
    "default_workers",
    "load_labelled",
]
