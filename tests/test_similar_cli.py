"""`hierax index` (in a subprocess), `hierax search` and `hierax fewshot` (in this process): outputs, and one-line
errors (missing index, empty REFS folder, a REFS class with one photo, an index made by another model)."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys

import pytest
from PIL import Image

from hierax.similar import ExtraSpecies, open_index
from tests.data_fixtures import make_checkpoint
from tests.similar_support import real_photos, variants

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def hierax(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "hierax", *args], capture_output=True, text=True, timeout=300, env=ENV)
    assert "Traceback" not in done.stderr, done.stderr
    return done


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    checkpoint = make_checkpoint(root / "tiny.safetensors", size=64, seed=0)
    other = make_checkpoint(root / "other.safetensors", size=64, seed=1)
    photos = root / "photos"
    photos.mkdir()
    refs = root / "refs"
    for name, image in list(real_photos().items())[:3]:
        for j, variant in enumerate(variants(image)):
            variant.save(photos / f"{name}_{j}.jpg", quality=85)
            (refs / name).mkdir(parents=True, exist_ok=True)
            variant.save(refs / name / f"{j}.jpg", quality=85)
    return root, checkpoint, other, photos, refs


@pytest.mark.slow
def test_index_then_search_and_errors(setup, cli):
    root, checkpoint, other, photos, _ = setup
    built = hierax(
        "index",
        str(photos),
        "--model",
        str(checkpoint),
        "-o",
        str(root / "ix"),
        "--quiet",
        "--workers",
        "0",
        "--duplicates",
        "0.99",
    )
    assert built.returncode == 0, built.stderr
    assert "15 photos in the index (15 new, exact)" in built.stderr and "duplicates.csv" in built.stderr
    found = cli(
        "search", str(photos / "chelsea_2.jpg"), "--index", str(root / "ix"), "-k", "3", "--workers", "0", "--quiet"
    )
    assert found.returncode == 0, found.stderr
    rows = list(csv.DictReader(io.StringIO(found.stdout)))
    assert [r["rank"] for r in rows] == ["1", "2", "3"] and rows[0]["path"].endswith("chelsea_2.jpg")
    assert "1 of 1 queries searched" in found.stderr
    saved = cli(
        "search", str(photos), "--index", str(root / "ix"), "-o", str(root / "hits.jsonl"), "--quiet", "--workers", "0"
    )
    assert saved.returncode == 0 and len((root / "hits.jsonl").read_text().splitlines()) == 15 * 10

    missing = cli("search", str(photos), "--index", str(root / "nowhere"))
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].startswith("hierax search: error: no similar-photo index at")
    refused = cli("search", str(photos), "--index", str(root / "ix"), "--model", str(other), "--quiet")
    assert refused.returncode == 1 and "made by another model" in refused.stderr
    added = cli("index", str(photos), "--model", str(other), "-o", str(root / "ix"), "--quiet")
    assert added.returncode == 1 and "made by another model" in added.stderr
    assert len(open_index(root / "ix")) == 15


@pytest.mark.slow
def test_fewshot_fit_show_and_errors(setup, tmp_path, cli):
    root, checkpoint, _, _, refs = setup
    out = tmp_path / "species.safetensors"
    fitted = cli("fewshot", "fit", str(refs), "--model", str(checkpoint), "-o", str(out), "--workers", "0")
    assert fitted.returncode == 0, fitted.stderr
    assert "3 species from 15 photos" in fitted.stderr and "unknown threshold" in fitted.stderr
    assert ExtraSpecies.load(out).class_names == ["astronaut", "chelsea", "coffee"]
    shown = cli("fewshot", "show", str(out))
    assert shown.returncode == 0 and '"chelsea": 5' in shown.stdout

    (tmp_path / "empty").mkdir()
    empty = cli("fewshot", "fit", str(tmp_path / "empty"), "--model", str(checkpoint), "-o", str(tmp_path / "x"))
    assert empty.returncode == 1 and "has no class folders" in empty.stderr

    lonely = tmp_path / "lonely"
    for name, count in [("a", 3), ("b", 1)]:
        (lonely / name).mkdir(parents=True)
        for j in range(count):
            Image.open(refs / ("chelsea" if name == "a" else "coffee") / f"{j}.jpg").save(lonely / name / f"{j}.jpg")
    kept = cli("fewshot", "fit", str(lonely), "--model", str(checkpoint), "-o", str(tmp_path / "l.safetensors"))
    assert kept.returncode == 0 and "one photo only for b" in kept.stderr and "add a second photo" in kept.stderr
    for path in (lonely / "a").glob("[12].jpg"):
        path.unlink()
    alone = cli("fewshot", "fit", str(lonely), "--model", str(checkpoint), "-o", str(tmp_path / "m.safetensors"))
    assert alone.returncode == 1 and "two or more photos of at least one species" in alone.stderr
    assert not (tmp_path / "m.safetensors").exists()
