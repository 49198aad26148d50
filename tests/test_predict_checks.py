"""What predict, embed, evaluate and serve check before they load a model or write a file: sizes, inputs without
images, backbones without a classifier; and what their outputs leave out (empty columns)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hierax.cli import main
from hierax.data.images import decode_image
from hierax.errors import HieraxError
from hierax.inference.classification import infer_batch, infer_image
from hierax.inference.evaluate import evaluate
from hierax.inference.loading import resolve_model
from hierax.inference.predict import embed, predict
from hierax.models import create_model
from hierax.serve import create_app
from hierax.transforms import classification_transform
from hierax.weights.files import ModelInfo, write_checkpoint
from tests.data_fixtures import TINY_CONFIG, make_checkpoint, make_inat_dataset, write_image
from tests.test_predict_cli import hierax


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    checkpoint = make_checkpoint(root / "tiny.pt", size=64)
    backbone = create_model("hieradet_d_tiny", 0, **TINY_CONFIG)
    info = ModelInfo.create("hieradet_d_tiny", {}, 64, config=TINY_CONFIG)
    backbone_path = write_checkpoint(root / "backbone.pt", backbone, info)
    images = [str(write_image(root / "photos" / f"{i}.jpg", i, (60, 44))) for i in range(2)]
    return root, checkpoint, backbone_path, images


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_bad_size_is_refused_before_anything_loads(setup, tmp_path, capsys):
    root, _, _, images = setup
    result = hierax("predict", images[0], "--model", tmp_path / "missing.pt", "--size", "0", "-o", tmp_path / "p.csv")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--size sides must be between 29 and 16384" in result.stderr and "missing.pt" not in result.stderr
    for command in (
        ["embed", images[0], "-o", tmp_path / "e.npy"],
        ["evaluate", tmp_path],
        ["serve"],
        ["predict", images[0], "-o", tmp_path / "p.csv"],
    ):
        for size in (["0"], ["tall"], ["64", "48", "32"]):
            assert main([str(a) for a in command] + ["--model", str(tmp_path / "missing.pt"), "--size", *size]) == 1
            err = capsys.readouterr().err
            assert "--size" in err and "missing.pt" not in err, (command, size, err)
    assert _files(tmp_path) == []
    with pytest.raises(HieraxError, match="size sides must be between"):
        predict(images, tmp_path / "missing.pt", size=0)


def test_every_size_spelling_means_the_same(setup, tmp_path, capsys):
    _, checkpoint, _, images = setup
    outputs = []
    for size in (["64", "48"], ["64x48"]):
        args = ["predict", *images, "--model", str(checkpoint), "--workers", "0", "--quiet", "--size", *size]
        assert main(args) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    net, info = resolve_model(checkpoint, size=(64, 48))
    probs, _ = infer_image(net, images[0], classification_transform(info.size, info.rgb_stats))
    first = outputs[0].splitlines()[1].split(",")
    assert float(first[2]) == pytest.approx(float(probs.max()), abs=2e-6)


def test_inputs_without_images_are_named_and_nothing_is_written(setup, tmp_path):
    _, checkpoint, _, _ = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    out = tmp_path / "out" / "pred.csv"
    result = hierax("predict", empty, "--model", checkpoint, "-o", out, "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"no images found in {empty}" in result.stderr
    assert _files(tmp_path) == ["empty"] and _files(empty) == ["notes.txt"]
    with pytest.raises(HieraxError, match="no images found"):
        embed([empty], checkpoint, output=tmp_path / "e.parquet")
    (tmp_path / "ds" / "crow").mkdir(parents=True)
    with pytest.raises(HieraxError, match="no images found in the dataset"):
        evaluate(tmp_path / "ds", tmp_path / "missing.pt")


def test_a_backbone_says_it_has_no_classifier(setup, tmp_path, capsys):
    root, _, backbone, images = setup
    out = tmp_path / "pred.csv"
    assert main(["predict", *images, "--model", str(backbone), "-o", str(out), "--workers", "0", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "without a classifier" in err and "hierax embed" in err and "--init-from" in err
    assert _files(tmp_path) == []
    json_path = make_inat_dataset(tmp_path / "ds", per_class=1)
    with pytest.raises(HieraxError, match="without a classifier"):
        evaluate(json_path, backbone, workers=0, progress=False)
    with pytest.raises(HieraxError, match="without a classifier"):
        create_app(*resolve_model(backbone))
    result = hierax("serve", "--model", backbone, "--port", "0")
    assert result.returncode == 1 and "without a classifier" in result.stderr and "Traceback" not in result.stderr
    summary = embed(images, backbone, workers=0, progress=False)
    assert summary.succeeded == 2 and summary.rows[0]["embedding"].shape == (128,)


def test_no_empty_common_name_column_without_names(setup, tmp_path):
    root, checkpoint, _, images = setup
    summary = predict(images, checkpoint, output=tmp_path / "p.csv", workers=0, progress=False)
    header = (tmp_path / "p.csv").read_text().splitlines()[0].split(",")
    assert "genus" in header and "common_name" not in header and summary.succeeded == 2
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"0": "Common Raven"}))
    rows = predict(images, checkpoint, common_names=names, workers=0, progress=False).rows
    assert all("common_name" in row for row in rows)


def test_stage_features_share_the_tta_of_infer_batch(setup):
    _, checkpoint, _, images = setup
    net, info = resolve_model(checkpoint)
    summary = embed(images[:1], (net, info), features=["stage4"], tta=True, workers=0, progress=False)
    x = classification_transform(info.size, info.rgb_stats)(decode_image(images[0]))[None]
    _, expected = infer_batch(net, x, return_embedding=True, tta=True)
    np.testing.assert_allclose(summary.rows[0]["embedding"], expected[0], atol=1e-5)
