"""`hierax weights import FILE`: the air-gapped half of the offline route. A file copied from a connected machine
goes into the cache under its registry entry's file name once its sha256 matches; anything else is refused,
leaving the cache as it was."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

import hierax
from hierax.cli import main
from hierax.errors import HieraxError
from hierax.models import create_model
from hierax.weights.cache import import_file
from hierax.weights.files import ModelInfo, write_checkpoint
from hierax.weights.paths import cache_dir
from tests.conftest import TINY

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, so any download would fail


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny checkpoint as a connected machine downloaded it, and its sha256."""
    net = create_model("hieradet_d_tiny", 3, **TINY)
    info = ModelInfo.create("hieradet_d_tiny", {"a": 0, "b": 1, "c": 2}, 64, config=TINY)
    path = write_checkpoint(tmp_path_factory.mktemp("usb") / "tiny_pub.pt", net, info)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def entry(published, hierax_home):
    _, sha = published
    return hierax.register_weights(
        "tiny-pub", network="hieradet_d_tiny", resolution=64, url=f"{UNREACHABLE}/tiny_pub.pt", sha256=sha, persist=True
    )


def _cache_files():
    return sorted(p.name for p in cache_dir().iterdir()) if cache_dir().exists() else []


def test_import_by_checksum_then_load_offline(published, entry, hierax_home, tmp_path, monkeypatch):
    path, _ = published
    renamed = tmp_path / "downloaded (1).pt"  # browsers rename: the checksum, not the name, identifies it
    shutil.copyfile(path, renamed)
    env = {**os.environ, "HIERAX_HOME": str(hierax_home), "HIERAX_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "hierax", "weights", "import", str(renamed)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "tiny-pub: imported" in result.stdout
    assert _cache_files() == ["tiny_pub.pt"] and (cache_dir() / "tiny_pub.pt").read_bytes() == path.read_bytes()
    monkeypatch.setenv("HIERAX_OFFLINE", "1")
    net, info = hierax.load_pretrained_model("tiny-pub", inference=True)
    assert info.class_names == ["a", "b", "c"] and net(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    again, where = import_file(renamed)  # already there: nothing copied
    assert again.name == "tiny-pub" and where == cache_dir() / "tiny_pub.pt" and _cache_files() == ["tiny_pub.pt"]


def test_a_damaged_copy_is_refused(published, entry, tmp_path, capsys):
    path, sha = published
    damaged = tmp_path / "tiny_pub.pt"
    damaged.write_bytes(path.read_bytes()[:-10])
    assert main(["weights", "import", str(damaged)]) == 1
    err = capsys.readouterr().err
    assert "named like 'tiny-pub'" in err and sha in err and "Nothing was imported" in err
    assert main(["weights", "import", str(damaged), "--name", "tiny-pub"]) == 1
    assert f"expects {sha}" in capsys.readouterr().err
    assert _cache_files() == []


def test_a_file_of_ones_own_is_refused_with_the_way_to_register_it(tmp_path, entry):
    own = tmp_path / "my_model.pt"
    own.write_bytes(b"not any registered file")
    with pytest.raises(HieraxError, match="matches no registered weights") as err:
        import_file(own)
    assert f"--model {own}" in str(err.value) and "hierax weights register NAME --path" in str(err.value)
    with pytest.raises(HieraxError, match="no such file"):
        import_file(tmp_path / "missing.pt")
    assert _cache_files() == []


def test_a_name_without_checksum_imports_unchecked(published, hierax_home, caplog):
    path, _ = published
    hierax.register_weights("tiny-nosha", network="hieradet_d_tiny", resolution=64, url=f"{UNREACHABLE}/other.pt")
    entry, where = import_file(path, "tiny-nosha")
    assert where == cache_dir() / "other.pt" and where.read_bytes() == path.read_bytes()
    assert "imported unchecked" in caplog.text
