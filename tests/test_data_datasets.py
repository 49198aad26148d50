"""Labelled datasets (class folders, iNat21 JSON, CSV), ImageDataset errors as values, collate."""

from __future__ import annotations

import datetime as dt
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from hierax.data.datasets import (
    CAPTURE_KEY,
    ImageDataset,
    PathTable,
    collate_samples,
    default_workers,
    load_labelled,
)
from hierax.data.images import decode_image
from hierax.data.metadata import Overrides
from hierax.errors import HieraxError
from tests.data_fixtures import CLASS_NAMES, COMMON_NAMES, make_inat_dataset, write_bad_files, write_image
from tests.test_data_metadata import pillow_exif


def test_path_table_roundtrip_and_pickle():
    paths = ["a/b.jpg", "é/ü.png", "", "x" * 300]
    table = PathTable(paths)
    assert list(table) == paths and len(table) == 4 and table[-1] == paths[-1] and table[1:3] == paths[1:3]
    assert list(pickle.loads(pickle.dumps(table))) == paths
    with pytest.raises(IndexError):
        table[4]


def test_inat_json(tmp_path):
    json_path = make_inat_dataset(tmp_path, per_class=2)
    data = load_labelled(json_path)
    assert data.class_names == CLASS_NAMES
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert data.paths[2] == str(tmp_path / "val" / CLASS_NAMES[1] / "0000.jpg")
    assert data.common_names[CLASS_NAMES[3]] == COMMON_NAMES[3]


def test_class_folders_equal_inat(tmp_path):
    make_inat_dataset(tmp_path, per_class=2)
    folders = load_labelled(tmp_path / "val")
    from_json = load_labelled(tmp_path / "val.json")
    assert list(folders.paths) == list(from_json.paths)
    assert folders.labels.tolist() == from_json.labels.tolist()
    assert folders.class_to_idx == from_json.class_to_idx


def test_csv_with_model_mapping(tmp_path):
    write_image(tmp_path / "img" / "a.jpg", 1)
    write_image(tmp_path / "img" / "b.jpg", 2)
    (tmp_path / "labels.csv").write_text(f"path,label\nimg/a.jpg,{CLASS_NAMES[2]}\nimg/b.jpg,{CLASS_NAMES[0]}\n")
    mapping = {name: i for i, name in enumerate(CLASS_NAMES)}
    data = load_labelled(tmp_path / "labels.csv", class_to_idx=mapping)
    assert data.labels.tolist() == [2, 0] and data.paths[0] == str(tmp_path / "img" / "a.jpg")
    headerless = tmp_path / "plain.csv"
    headerless.write_text("img/a.jpg,crow\nimg/b.jpg,oak\n")
    assert load_labelled(headerless).class_to_idx == {"crow": 0, "oak": 1}
    with pytest.raises(HieraxError, match="not among the model's classes"):
        load_labelled(headerless, class_to_idx=mapping)


def test_bad_dataset_paths(tmp_path):
    with pytest.raises(HieraxError, match="no such dataset"):
        load_labelled(tmp_path / "missing")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(HieraxError, match="not an iNat21"):
        load_labelled(tmp_path / "x.json")
    with pytest.raises(HieraxError, match="no class folders"):
        load_labelled(tmp_path)


def test_errors_as_values_through_dataloader_workers(tmp_path):
    bad = write_bad_files(tmp_path / "bad")
    good = [str(write_image(tmp_path / f"good{i}.png", i, (40 + i, 36))) for i in range(3)]
    paths = [good[0], *bad, good[1], good[2]]

    def resize(image: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(image[None].float(), size=(32, 32), mode="bilinear")[0]

    dataset = ImageDataset(paths, resize, labels=list(range(len(paths))))
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_samples)
    batches = list(loader)
    images = torch.cat([b["images"] for b in batches if b["images"] is not None])
    assert images.shape == (3, 3, 32, 32)
    assert [p for b in batches for p in b["paths"]] == good
    assert [i for b in batches for i in b["indices"].tolist()] == [0, 6, 7]
    assert [i for b in batches for i in b["labels"].tolist()] == [0, 6, 7]
    torch.testing.assert_close(images[1], resize(decode_image(good[1])))
    errors = [e for b in batches for e in b["errors"]]
    assert [e[1] for e in errors] == list(bad)
    for _, path, reason in errors:
        assert bad[path] in reason, (path, reason)


def test_all_bad_batch_and_transform_failure(tmp_path):
    bad = write_bad_files(tmp_path)
    batch = collate_samples([ImageDataset(list(bad))[i] for i in range(len(bad))])
    assert batch["images"] is None and len(batch["errors"]) == len(bad) and batch["labels"].numel() == 0

    def failing(image: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom")

    write_image(tmp_path / "ok.jpg", 3)
    sample = ImageDataset([str(tmp_path / "ok.jpg")], failing)[0]
    assert sample["image"] is None and "boom" in sample["error"] and sample["label"] == -1


def test_labels_length_mismatch():
    with pytest.raises(HieraxError):
        ImageDataset(["a.jpg"], labels=np.array([0, 1]))


def test_metadata_travels_with_its_image_through_the_loader(tmp_path):
    bad = write_bad_files(tmp_path / "bad")
    good = [str(write_image(tmp_path / f"good{i}.png", i)) for i in range(2)]
    paths = [good[0], next(iter(bad)), good[1]]
    meta = [{"latitude": 51.5}, {"latitude": 0.0}, {"latitude": -33.9, "date": "2024-05-01"}]
    batches = list(DataLoader(ImageDataset(paths, meta=meta), batch_size=3, collate_fn=collate_samples))
    assert batches[0]["meta"] == [meta[0], meta[2]] and batches[0]["paths"] == good
    assert collate_samples([ImageDataset(good)[0]])["meta"] == [{}]
    with pytest.raises(HieraxError, match="metadata rows"):
        ImageDataset(good, meta=meta)


def test_default_workers_follow_the_cpus_and_the_ranks(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert default_workers() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_workers() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers() == 1


def test_capture_context_is_read_in_the_workers_beside_the_pixels(tmp_path):
    """Where and when, per decoded image: EXIF GPS and date, CSV columns before EXIF, overrides before both;
    corrupt EXIF costs the image its place, never its pixels; no capture key unless asked."""
    paris = tmp_path / "paris.jpg"
    Image.new("RGB", (40, 30), (90, 140, 60)).save(paris, exif=pillow_exif(48.8566, 2.3522))
    corrupt = tmp_path / "corrupt.jpg"
    blob = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05" + b"\x88\x25\x00\x04\x00\x00\x00\x01\x7f\xff\xff\xff" * 5
    Image.new("RGB", (40, 30), (9, 14, 6)).save(corrupt, exif=blob)
    bad = next(iter(write_bad_files(tmp_path / "bad")))
    paths = [str(paris), str(corrupt), bad, str(paris)]
    meta = [{}, {}, {}, {"latitude": "-33.9", "longitude": "151.2", "site": "B"}]
    loader = DataLoader(
        ImageDataset(paths, meta=meta, capture=Overrides()), batch_size=4, num_workers=1, collate_fn=collate_samples
    )
    (batch,) = list(loader)
    exif, broken, csv = (m[CAPTURE_KEY] for m in batch["meta"])
    assert (exif.latitude, exif.longitude, exif.location_source) == pytest.approx((48.8566, 2.3522, "exif"), abs=1e-4)
    assert exif.date == dt.date(2023, 7, 14) and exif.date_source == "exif"
    assert not broken.has_location and broken.warnings == ("EXIF GPS ignored: unparseable",)
    assert batch["images"].shape[0] == 3 and [e[1] for e in batch["errors"]] == [bad]
    assert (csv.latitude, csv.location_source, csv.date_source) == (-33.9, "csv", "exif")
    assert batch["meta"][2]["site"] == "B"
    fixed = ImageDataset([str(paris)], capture=Overrides.from_args((1.0, 2.0), "2020-02-02"))[0]["meta"][CAPTURE_KEY]
    assert (fixed.latitude, fixed.date, fixed.location_source) == (1.0, dt.date(2020, 2, 2), "override")
    assert CAPTURE_KEY not in ImageDataset([str(paris)])[0]["meta"]
