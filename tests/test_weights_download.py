"""Downloads from a local HTTP server on 127.0.0.1: good file, sha mismatch, broken transfer, missing file,
offline mode, no network, the cache on a second call, and `hierax weights download`."""

import hashlib
import os
import socket
import subprocess
import sys

import pytest
import torch

import hierax
from hierax.cli import main
from hierax.errors import DownloadError, OfflineError
from hierax.models import create_model
from hierax.weights import catalog
from hierax.weights.download import fetch
from hierax.weights.files import ModelInfo, write_checkpoint
from hierax.weights.paths import cache_dir
from tests.conftest import TINY


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    net = create_model("hieradet_d_tiny", 3, **TINY)
    info = ModelInfo.create("hieradet_d_tiny", {"a": 0, "b": 1, "c": 2}, 64, config=TINY)
    return write_checkpoint(tmp_path_factory.mktemp("w") / "tiny.pt", net, info).read_bytes()


def _register(name, url, sha):
    return hierax.register_weights(name, network="hieradet_d_tiny", resolution=64, url=url, sha256=sha)


def _leftovers():
    return [p for p in cache_dir().glob("*") if p.name.startswith(".")] if cache_dir().exists() else []


def test_download_verify_and_cache(file_server, hierax_home, payload):
    file_server.files["tiny_good.pt"] = payload
    _register("tiny-good", file_server.url("tiny_good.pt"), hashlib.sha256(payload).hexdigest())
    net, info = hierax.load_pretrained_model("tiny-good")
    assert (hierax_home / "weights" / "tiny_good.pt").read_bytes() == payload
    assert info.class_names == ["a", "b", "c"]
    hierax.load_pretrained_model("tiny-good")
    assert file_server.hits["tiny_good.pt"] == 1


def test_sha_mismatch_leaves_nothing(file_server, hierax_home, payload):
    file_server.files["tiny_bad.pt"] = payload
    _register("tiny-bad", file_server.url("tiny_bad.pt"), "0" * 64)
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        hierax.load_pretrained_model("tiny-bad")
    assert not (cache_dir() / "tiny_bad.pt").exists() and not _leftovers()


def test_broken_transfer_leaves_nothing(file_server, hierax_home, payload):
    file_server.files["tiny_cut.pt"] = payload
    file_server.broken.add("tiny_cut.pt")
    _register("tiny-cut", file_server.url("tiny_cut.pt"), hashlib.sha256(payload).hexdigest())
    with pytest.raises(DownloadError, match="broke off"):
        fetch(catalog.resolve("tiny-cut"), progress=False)
    assert not (cache_dir() / "tiny_cut.pt").exists() and not _leftovers()


def test_missing_file_is_http_404(file_server, hierax_home):
    _register("tiny-missing", file_server.url("nope.pt"), None)
    with pytest.raises(DownloadError, match="HTTP 404"):
        hierax.load_pretrained_model("tiny-missing")


def test_offline_names_file_and_place(hierax_home, monkeypatch):
    monkeypatch.setenv("HIERAX_OFFLINE", "1")
    entry = catalog.resolve("hieradet_small_dino-v2-inat21")
    with pytest.raises(OfflineError) as err:
        hierax.load_pretrained_model("hieradet_small_dino-v2-inat21")
    message = str(err.value)
    assert "hieradet_d_small_dino-v2-inat21.pt" in message and entry.sha256 in message
    assert "hierax weights download hieradet_small_dino-v2-inat21" in message and "hierax weights import" in message
    assert str(hierax_home / "weights" / "hieradet_d_small_dino-v2-inat21.pt") in message


def test_no_network_is_offline_error(hierax_home):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _register("tiny-unreachable", f"http://127.0.0.1:{port}/tiny.pt", None)
    with pytest.raises(OfflineError, match="no network"):
        hierax.load_pretrained_model("tiny-unreachable")


def test_local_path_entry(tmp_path, payload):
    (tmp_path / "mine.pt").write_bytes(payload)
    hierax.register_weights("tiny-local", network="hieradet_d_tiny", resolution=64, path=tmp_path / "mine.pt")
    net, info = hierax.load_pretrained_model("tiny-local", inference=True)
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    with pytest.raises(ValueError, match="exactly one"):
        hierax.register_weights("x", network="hieradet_d_tiny", resolution=64)


def test_cli_download_into_the_cache_with_a_progress_bar(file_server, hierax_home, payload):
    """`hierax weights download NAME` in another process, for a name that process knows from the user registry."""
    file_server.files["tiny_cli.pt"] = payload
    sha = hashlib.sha256(payload).hexdigest()
    hierax.register_weights(
        "tiny-cli", network="hieradet_d_tiny", resolution=64, url=file_server.url("tiny_cli.pt"), sha256=sha,
        persist=True,
    )  # fmt: skip
    env = {**os.environ, "HIERAX_HOME": str(hierax_home)}
    env.pop("HIERAX_OFFLINE", None)
    result = subprocess.run(
        [sys.executable, "-m", "hierax", "weights", "download", "tiny-cli"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cached = hierax_home / "weights" / "tiny_cli.pt"
    assert cached.read_bytes() == payload and str(cached) in result.stdout
    assert "tiny_cli.pt" in result.stderr and "100%" in result.stderr  # tqdm's bar
    assert not _leftovers()
    assert main(["weights", "download", "tiny-cli"]) == 0  # cached: no second transfer
    assert file_server.hits["tiny_cli.pt"] == 1


def test_every_name_is_checked_before_the_first_download(file_server, hierax_home, payload, capsys):
    file_server.files["tiny_first.pt"] = payload
    _register("tiny-first", file_server.url("tiny_first.pt"), None)
    assert main(["weights", "download", "tiny-first", "no-such-weights"]) == 1
    assert "no-such-weights" in capsys.readouterr().err and "tiny_first.pt" not in file_server.hits
