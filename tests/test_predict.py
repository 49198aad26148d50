"""predict / embed library functions on a tiny random-weight checkpoint: formats, real photos, bad files,
resume, species lists and roll-up, and equality with infer_image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hierax.data.images import decode_image
from hierax.errors import HieraxError
from hierax.inference import writers
from hierax.inference.classification import infer_image
from hierax.inference.loading import resolve_model
from hierax.inference.predict import embed, predict
from hierax.transforms import classification_transform
from tests.data_fixtures import (
    CLASS_NAMES,
    COMMON_NAMES,
    FORMATS,
    make_checkpoint,
    make_inat_dataset,
    write_bad_files,
    write_image,
)

SIZE = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors", size=SIZE)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Generated images in every format plus real photos from scikit-image and scikit-learn."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_image

    root = tmp_path_factory.mktemp("photos")
    paths = [str(write_image(root / f"gen_{ext}.{ext}", seed=i, size=(60, 44))) for i, ext in enumerate(FORMATS)]
    for name, array in [
        ("chelsea", skdata.chelsea()),
        ("coffee", skdata.coffee()),
        ("astronaut", skdata.astronaut()),
        ("flower", load_sample_image("flower.jpg")),
    ]:
        path = root / "real" / f"{name}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(array).save(path, quality=90)
        paths.append(str(path))
    return paths


def expected(net_info, path):
    net, info = net_info
    probs, emb = infer_image(net, path, classification_transform(info.size, info.rgb_stats), return_embedding=True)
    return probs[0], emb[0]


def test_corrupt_files_mixed_with_good(tmp_path, checkpoint, photos):
    bad = write_bad_files(tmp_path / "bad")
    bad_paths = list(bad)
    sources = [photos[0], bad_paths[0], *photos[1:4], *bad_paths[1:], *photos[4:]]
    summary = predict(
        sources, checkpoint, output=tmp_path / "out.csv", top_k=3, batch_size=3, workers=2, progress=False
    )
    assert (summary.total, summary.succeeded, summary.failed) == (len(sources), len(photos), len(bad))
    rows = writers.read_rows(tmp_path / "out.csv")
    assert [r["path"] for r in rows] == photos
    net_info = resolve_model(checkpoint)
    for row in rows:
        assert all(row[c] != "" for c in row if c != "common_name"), row
        probs, _ = expected(net_info, row["path"])
        order = np.argsort(-probs)[:3]
        assert [row[f"label_{i + 1}"] for i in range(3)] == [CLASS_NAMES[j] for j in order]
        # The CSV keeps 6 digits; batched float32 matmuls add about 2e-6 against the one-image path.
        np.testing.assert_allclose([float(row[f"prob_{i + 1}"]) for i in range(3)], probs[order], atol=5e-6)
        taxon_best = CLASS_NAMES[order[0]].split("_")
        assert row["genus"] == taxon_best[6] and row["species"] == f"{taxon_best[6]} {taxon_best[7]}"
    errors = writers.read_errors(tmp_path / "out.errors.csv")
    assert sorted(p for p, _ in errors) == sorted(bad)
    for path, reason in errors:
        assert bad[path] in reason


def test_in_memory_rows_common_names_rollup_species_list(tmp_path, checkpoint, photos):
    json_path = make_inat_dataset(tmp_path, per_class=1)
    summary = predict(
        photos[:3],
        checkpoint,
        common_names=json_path,
        rollup=True,
        species_list=["Corvus corax", "Corvus corone"],
        workers=0,
        progress=False,
    )
    assert summary.output is None and len(summary.rows) == 3
    for row in summary.rows:
        # Only the two listed species fill top-k slots: no excluded class appears with probability 0.
        assert {row["label_1"], row["label_2"]} == set(CLASS_NAMES[:2]) and "prob_3" not in row
        assert row["prob_1"] + row["prob_2"] == pytest.approx(1.0, abs=2e-6)
        assert row["common_name"] == COMMON_NAMES[CLASS_NAMES.index(row["label_1"])]
        if row["prob_1"] >= 0.8:
            assert (row["rollup_rank"], row["rollup_name"]) == ("species", row["species"])
        else:
            assert (row["rollup_rank"], row["rollup_name"], row["rollup_prob"]) == ("genus", "Corvus", 1.0)
    bad = write_bad_files(tmp_path / "bad")
    only_bad = predict(list(bad), checkpoint, workers=0, progress=False)
    assert only_bad.succeeded == 0 and sorted(p for p, _ in only_bad.errors) == sorted(bad)
    with pytest.raises(HieraxError, match="unknown rank"):
        predict(photos[:1], checkpoint, rollup=True, thresholds={"tribe": 0.5}, workers=0, progress=False)


def test_resume_skips_done_paths_and_keeps_rows(tmp_path, checkpoint, photos):
    out = tmp_path / "pred.parquet"
    first = predict(photos[:4], checkpoint, output=out, chunk_size=2, workers=0, progress=False)
    assert first.succeeded == 4 and not writers.parts_dir(out).exists()
    second = predict(photos, checkpoint, output=out, resume=True, chunk_size=2, workers=0, progress=False)
    assert (second.skipped, second.succeeded) == (4, len(photos) - 4)
    rows = writers.read_rows(out)
    assert [r["path"] for r in rows] == photos and isinstance(rows[0]["prob_1"], float)
    fresh = predict(photos[:2], checkpoint, output=out, workers=0, progress=False)
    assert fresh.skipped == 0 and len(writers.read_rows(out)) == 2


def test_jsonl_output_and_size_override(tmp_path, checkpoint, photos):
    out = tmp_path / "pred.jsonl"
    predict(photos[:2], checkpoint, output=out, top_k=10, size=32, workers=0, progress=False)
    rows = writers.read_rows(out)
    assert len(rows) == 2 and "label_4" in rows[0] and "label_5" not in rows[0]
    net, info = resolve_model(checkpoint, size=32)
    probs, _ = infer_image(net, photos[0], classification_transform(info.size, info.rgb_stats))
    assert rows[0]["prob_1"] == pytest.approx(float(probs.max()), abs=2e-6)


def test_embed_parquet_and_npy_with_features(tmp_path, checkpoint, photos):
    bad = write_bad_files(tmp_path / "bad")
    sources = [*photos[:3], *bad]
    summary = embed(
        sources, checkpoint, output=tmp_path / "emb.parquet", features=["stage1", "stage4"], workers=1, progress=False
    )
    assert (summary.succeeded, summary.failed) == (3, len(bad))
    rows = writers.read_rows(tmp_path / "emb.parquet")
    net_info = resolve_model(checkpoint)
    _, emb0 = expected(net_info, photos[0])
    np.testing.assert_allclose(rows[0]["embedding"], emb0, atol=1e-5)
    assert rows[0]["embedding"].dtype == np.float32 and rows[0]["stage1"].shape == (16,)
    net, info = net_info
    x = classification_transform(info.size, info.rgb_stats)(decode_image(photos[0]))[None]
    stage1 = net.forward_stages(x)[0].mean(dim=(1, 2))[0].detach().numpy()
    np.testing.assert_allclose(rows[0]["stage1"], stage1, atol=1e-5)
    embed(photos[:3], checkpoint, output=tmp_path / "emb.npy", workers=0, progress=False)
    arr = np.load(tmp_path / "emb.npy")
    assert arr.shape == (3, 128) and arr.dtype == np.float32
    assert (tmp_path / "emb.paths.txt").read_text().splitlines() == photos[:3]
    np.testing.assert_allclose(arr[0], emb0, atol=1e-5)
    with pytest.raises(HieraxError, match=".parquet or .npy"):
        embed(photos[:1], checkpoint, output=tmp_path / "emb.csv")


def test_loaded_pair_and_tta(checkpoint, photos):
    net_info = resolve_model(checkpoint)
    summary = predict(photos[:2], net_info, tta=True, top_k=1, workers=0, progress=False)
    net, info = net_info
    probs, _ = infer_image(net, photos[1], classification_transform(info.size, info.rgb_stats), tta=True)
    assert summary.rows[1]["prob_1"] == pytest.approx(float(probs.max()), abs=2e-6)
