"""evaluate: metrics on hand-made predictions, and a full run on a generated iNat21-layout dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hierax.data.datasets import load_labelled
from hierax.data.taxonomy import Taxonomy
from hierax.errors import HieraxError
from hierax.inference.evaluate import (
    calibration,
    compute_metrics,
    evaluate,
    format_summary,
    map_labels,
    most_confused,
)
from tests.data_fixtures import CLASS_NAMES, make_checkpoint, make_inat_dataset, write_bad_files


def test_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 3])
    top5 = np.array([[0, 1], [1, 0], [1, 0], [0, 2], [2, 3], [2, 3]])
    conf = np.array([0.9, 0.6, 0.8, 0.55, 0.95, 0.7])
    report = compute_metrics(labels, top5, conf, CLASS_NAMES, bins=10)
    assert report["top1"] == pytest.approx(3 / 6) and report["top5"] == pytest.approx(5 / 6)
    per_class = {c["class"]: c for c in report["per_class"]}
    assert per_class[CLASS_NAMES[0]]["top1"] == 0.5 and per_class[CLASS_NAMES[3]]["top5"] == 1.0
    assert report["mean_per_class_top1"] == pytest.approx((0.5 + 0.5 + 1 + 0) / 4)
    # genus: Corvus holds classes 0 and 1, so 0->1 and 1->0 confusions are right at genus level.
    assert report["per_rank"]["species"] == pytest.approx(3 / 6)
    assert report["per_rank"]["genus"] == pytest.approx(5 / 6)
    assert report["per_rank"]["family"] == pytest.approx(5 / 6)
    assert report["per_rank"]["kingdom"] == pytest.approx(5 / 6)
    assert report["most_confused"][0]["count"] == 1 and len(report["most_confused"]) == 3
    assert "top-1 50.00%" in format_summary(report)


def test_calibration_ece():
    ece, table = calibration(np.array([0.95, 0.95, 0.3, 0.3]), np.array([1, 0, 0, 0]), bins=4)
    assert ece == pytest.approx(0.5 * abs(0.5 - 0.95) + 0.5 * abs(0.0 - 0.3))
    assert [b["count"] for b in table] == [0, 2, 0, 2]
    perfect, _ = calibration(np.array([1.0, 1.0]), np.array([1, 1]))
    assert perfect == 0.0


def test_most_confused_order():
    pairs = most_confused(np.array([0, 0, 0, 1, 1]), np.array([1, 1, 0, 0, 1]), ["a", "b"])
    assert pairs == [
        {"true": "a", "predicted": "b", "count": 2, "fraction_of_true": 2 / 3},
        {"true": "b", "predicted": "a", "count": 1, "fraction_of_true": 0.5},
    ]


def test_evaluate_inat_dataset(tmp_path):
    json_path = make_inat_dataset(tmp_path / "ds", per_class=3)
    write_bad_files(tmp_path / "bad")
    doc = json.loads(json_path.read_text())
    doc["images"].append({"id": 999, "file_name": "../bad/truncated.jpg"})
    doc["annotations"].append({"id": 999, "image_id": 999, "category_id": 0})
    json_path.write_text(json.dumps(doc))
    checkpoint = make_checkpoint(tmp_path / "m.pt", size=64)
    report = evaluate(json_path, checkpoint, output_dir=tmp_path / "eval", workers=1, progress=False)
    assert report["evaluated"] == 12 and report["failed"] == 1 and "truncated" in report["errors"][0]["reason"]
    assert set(report["per_rank"]) == {"kingdom", "phylum", "class", "order", "family", "genus", "species"}
    assert report["per_rank"]["kingdom"] >= report["per_rank"]["genus"] >= report["per_rank"]["species"]
    assert 0.0 <= report["top1"] <= report["top5"] == 1.0
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["top1"] == report["top1"] and len(saved["per_class"]) == 4
    for png in ("confusion_matrix.png", "reliability.png"):
        with Image.open(tmp_path / "eval" / png) as image:
            assert image.size[0] > 200 and image.size[1] > 200
    assert "per rank" in (tmp_path / "eval" / "summary.txt").read_text()


def test_map_labels_by_binomial_common_name_or_index(tmp_path):
    (tmp_path / "labels.csv").write_text("path,label\na.jpg,Corvus corone\nb.jpg,english oak\nc.jpg,2\n")
    taxonomy = Taxonomy(CLASS_NAMES, {3: "English Oak"})
    assert map_labels(load_labelled(tmp_path / "labels.csv"), taxonomy).tolist() == [1, 3, 2]
    (tmp_path / "bad.csv").write_text("path,label\na.jpg,Unicornus magicus\n")
    with pytest.raises(HieraxError, match="not among the model's classes: Unicornus magicus"):
        map_labels(load_labelled(tmp_path / "bad.csv"), taxonomy)
