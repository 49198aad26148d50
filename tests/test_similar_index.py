"""hierax.similar index and search on real photos with a random-weight tiny HieraDet (random features are enough
to find a photo's own crops, flips and colour shifts): recall@1, adding photos, another model refused,
near-duplicates, and resume after SIGKILL in a real subprocess."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hierax.errors import HieraxError
from hierax.inference.writers import parts_dir
from hierax.similar import ModelMismatchError, build_index, embed_images, open_index, search_images
from hierax.similar.index import DUPLICATES, EMBEDDINGS, read_manifest
from hierax.similar.search import load_matching_model
from tests.data_fixtures import make_checkpoint, write_bad_files, write_image
from tests.similar_support import photo_variants

OPTIONS = dict(workers=0, progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """A tiny network on a shared 2-core machine: one thread is far faster than two fighting other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors", size=64, seed=0)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("other") / "other.safetensors", size=64, seed=1)


@pytest.fixture(scope="module")
def variant_photos(tmp_path_factory):
    return photo_variants(tmp_path_factory.mktemp("variants"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, checkpoint, variant_photos):
    paths, _ = variant_photos
    return build_index(paths, checkpoint, output=tmp_path_factory.mktemp("ix") / "index", **OPTIONS)


def test_search_returns_a_photos_own_variants_first(built, variant_photos):
    paths, groups = variant_photos
    group_of = dict(zip(paths, groups))
    result = search_images(paths, built.index, k=5, **OPTIONS)
    assert result.errors == [] and len(result.rows) == 5 * len(paths)
    by_query: dict[str, list[dict]] = {}
    for row in result.rows:
        by_query.setdefault(row["query"], []).append(row)
    assert set(by_query) == set(paths)
    first_other = []
    for query, rows in by_query.items():
        assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
        assert rows[0]["path"] == query and rows[0]["similarity"] > 0.9999  # itself
        assert all(a["similarity"] >= b["similarity"] for a, b in zip(rows, rows[1:]))
        first_other.append(group_of[rows[1]["path"]] == group_of[query])
    recall_at_1 = float(np.mean(first_other))
    # 14 photos x 5 versions; measured 0.90 (63 of 70; the misses are colour-shifted stamps). Chance is 4/69.
    assert recall_at_1 >= 0.85, recall_at_1


def test_the_index_records_its_model_and_reopens(built, checkpoint):
    index = open_index(built.index.directory)
    assert len(index) == 70 and index.kind == "exact"
    assert index.model.model == str(checkpoint.resolve()) and index.model.embedding_dim == 128
    assert index.model.num_classes == 4 and index.model.size == (64, 64) and len(index.model.fingerprint) == 64
    manifest = read_manifest(index.directory)
    assert manifest["complete"] and manifest["count"] == 70 and manifest["vectors"]["library"] == "faiss"


def test_adding_photos_equals_building_at_once(tmp_path, checkpoint, variant_photos):
    paths, _ = variant_photos
    bad = list(write_bad_files(tmp_path / "bad"))[:2]
    first = build_index(paths[:30] + bad, checkpoint, output=tmp_path / "ix", **OPTIONS)
    assert first.added == 30 and first.run.failed == 2
    second = build_index(paths, checkpoint, output=tmp_path / "ix", **OPTIONS)
    assert second.added == 40 and second.run.skipped == 30 and len(second.index) == 70
    again = build_index(paths[:5], checkpoint, output=tmp_path / "ix", **OPTIONS)
    assert again.added == 0 and len(again.index) == 70
    incremental = open_index(tmp_path / "ix")
    assert incremental.paths == paths
    net, info, identity = load_matching_model(incremental.model, "test")
    _, queries, _ = embed_images(paths[::7], net, info, workers=0)
    got = incremental.search(queries, 6)
    want = open_index(tmp_path / "ix").search(queries, 6)
    assert [[m.path for m in row] for row in got] == [[m.path for m in row] for row in want]
    # the same photos, embedded in one run: the same neighbours and similarities
    _, all_at_once, _ = embed_images(paths, net, info, workers=0)
    sims = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        all_at_once / np.linalg.norm(all_at_once, axis=1, keepdims=True)
    ).T
    for row, s in zip(got, sims):
        np.testing.assert_allclose([m.similarity for m in row], np.sort(s)[::-1][:6], atol=1e-5)


def test_an_index_made_by_another_model_is_refused(tmp_path, built, other_checkpoint, variant_photos):
    paths, _ = variant_photos
    directory = built.index.directory
    with pytest.raises(ModelMismatchError, match="made by another model") as err:
        build_index(paths[:3], other_checkpoint, output=directory, **OPTIONS)
    assert "--model" in str(err.value) and "tiny.safetensors" in str(err.value)
    with pytest.raises(ModelMismatchError, match="made by another model"):
        search_images(paths[:2], directory, other_checkpoint, **OPTIONS)
    with pytest.raises(ModelMismatchError, match="input size 64x64"):
        build_index(paths[:3], built.index.model.model, output=directory, size=96, **OPTIONS)
    assert len(open_index(directory)) == 70  # refused before anything was written
    renamed = tmp_path / "renamed.safetensors"
    shutil.copy(built.index.model.model, renamed)  # the weights decide, not the file name
    assert len(search_images(paths[:1], directory, renamed, k=3, **OPTIONS).rows) == 3


def test_near_duplicates_are_every_pair_above_the_threshold(tmp_path, checkpoint, variant_photos):
    paths, _ = variant_photos
    copy = tmp_path / "chelsea_copy.jpg"
    shutil.copy(paths[0], copy)
    summary = build_index([*paths[:20], str(copy)], checkpoint, output=tmp_path / "ix", duplicates=0.97, **OPTIONS)
    assert summary.duplicates == tmp_path / "ix" / DUPLICATES
    with open(summary.duplicates, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and list(rows[0]) == ["path_a", "path_b", "similarity"]
    assert (rows[0]["path_a"], rows[0]["path_b"]) == (paths[0], str(copy)) and float(rows[0]["similarity"]) > 0.9999
    vectors = summary.index.vectors.vectors()
    sims = vectors @ vectors.T
    names = summary.index.paths
    want = {(names[a], names[b]) for a, b in zip(*np.nonzero(np.triu(sims >= 0.97, k=1)))}
    assert {(r["path_a"], r["path_b"]) for r in rows} == want
    with pytest.raises(HieraxError, match=r"cosine similarity in \[-1, 1\]"):
        build_index(paths[:2], checkpoint, output=tmp_path / "ix2", duplicates=1.5, **OPTIONS)


def test_missing_and_foreign_folders_are_clear_errors(tmp_path, checkpoint, variant_photos):
    with pytest.raises(HieraxError, match="no similar-photo index at .*hierax index"):
        open_index(tmp_path / "nothing")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "notes.txt").write_text("mine")
    with pytest.raises(HieraxError, match="is not a similar-photo index"):
        build_index(variant_photos[0][:2], checkpoint, output=tmp_path / "photos", **OPTIONS)
    assert (tmp_path / "photos" / "notes.txt").read_text() == "mine"


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hierax", *args], capture_output=True, text=True, timeout=300, env=ONE_THREAD
    )


@pytest.mark.slow
def test_index_resume_after_sigkill_loses_nothing(tmp_path, checkpoint):
    photos = [str(write_image(tmp_path / "photos" / f"{i:03d}.png", seed=i, size=(48, 40))) for i in range(60)]
    listing = tmp_path / "photos.txt"
    listing.write_text("".join(f"{p}\n" for p in photos))
    directory = tmp_path / "ix"
    script = (
        "import sys\nfrom hierax.similar import build_index\n"
        "build_index([sys.argv[1]], sys.argv[2], output=sys.argv[3], chunk_size=1, batch_size=1, workers=0,"
        " progress=False)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(listing), str(checkpoint), str(directory)], env=ONE_THREAD
    )
    parts = parts_dir(directory / EMBEDDINGS)
    deadline = time.monotonic() + 240
    while len(list(parts.glob("part-*.parquet"))) < 3:
        assert child.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no embedding chunks appeared"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    kept = len(list(parts.glob("part-*.parquet")))
    assert 3 <= kept < len(photos) and not read_manifest(directory)["complete"]

    refused = _run_cli("index", str(listing), "--model", str(checkpoint), "--output", str(directory), "--quiet")
    assert refused.returncode == 1 and "unfinished run" in refused.stderr and "--resume" in refused.stderr
    assert "Traceback" not in refused.stderr

    resumed = _run_cli(
        "index", str(listing), "--model", str(checkpoint), "--output", str(directory), "--resume", "--workers", "0"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"{kept} skipped (already done)" in resumed.stderr and "60 photos in the index" in resumed.stderr
    index = open_index(directory)
    assert sorted(index.paths) == sorted(photos) and not parts.exists()
    net, info, _ = load_matching_model(index.model, "test")
    paths, clean, _ = embed_images(photos, net, info, workers=0)
    stored = index.vectors.vectors()
    order = [index.paths.index(p) for p in paths]
    np.testing.assert_allclose(stored[order], clean / np.linalg.norm(clean, axis=1, keepdims=True), atol=1e-5)
