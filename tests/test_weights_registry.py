"""The user registry ($HIERAX_HOME/registry.json): a name registered in one process (by `register_weights(...,
persist=True)` or `hierax weights register`) is known to `hierax info` and `hierax predict` in another; layers,
removal, a malformed file, and names that are networks rather than weights."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from skimage import data

import hierax
from hierax.cli import main
from hierax.errors import HieraxError, ModelNotFoundError
from hierax.models import create_model
from hierax.weights import catalog
from hierax.weights.files import ModelInfo, write_checkpoint
from hierax.weights.paths import registry_path
from tests.conftest import TINY, inat_names


def _hierax(*args, home, offline=True):
    env = {**os.environ, "HIERAX_HOME": str(home)}
    if offline:
        env["HIERAX_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "hierax", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def tiny_file(tmp_path):
    torch.manual_seed(0)
    net = create_model("hieradet_d_tiny", 4, **TINY).eval()
    info = ModelInfo.create("hieradet_d_tiny", {n: i for i, n in enumerate(inat_names(4))}, (64, 96), config=TINY)
    return write_checkpoint(tmp_path / "my_birds.pt", net, info), net


def test_persisted_name_reaches_predict_in_another_process(tmp_path, hierax_home, tiny_file):
    path, net = tiny_file
    hierax.register_weights("my-birds", network="hieradet_d_tiny", resolution=(64, 96), path=path, persist=True)
    saved = json.loads(registry_path().read_text())
    assert saved["weights"][0]["name"] == "my-birds" and saved["weights"][0]["path"] == str(path.resolve())
    photo = tmp_path / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(photo)
    out = tmp_path / "preds.csv"
    result = _hierax("predict", str(photo), "--model", "my-birds", "-o", str(out), "--workers", "0", home=hierax_home)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and rows[0]["label_1"] in inat_names(4)


def test_cli_register_then_info_and_remove(hierax_home, tiny_file, capsys):
    path, _ = tiny_file
    result = _hierax("weights", "register", "mine", "--path", str(path), "--alias", "mine2", home=hierax_home)
    assert result.returncode == 0, result.stderr
    assert "registered 'mine'" in result.stdout
    entry = catalog.resolve("mine2")  # registered by another process, read from the file here
    assert entry.name == "mine" and entry.num_classes == 4 and entry.network == "hieradet_d_tiny"
    assert entry.resolution == (64, 96) and entry.config["embed_dim"] == 16 and entry.sha256 and entry.size_mib
    assert main(["info", "mine2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["name"] == "mine" and got["num_classes"] == 4 and got["input_size"] == [64, 96]
    assert main(["weights", "list"]) == 0
    assert any(line.startswith("mine ") and " cached" in line for line in capsys.readouterr().out.splitlines())
    assert main(["weights", "remove", "mine"]) == 0
    assert main(["info", "mine"]) == 1
    assert "No pretrained model or file named 'mine'" in capsys.readouterr().err


def test_url_entry_needs_network_and_size(hierax_home, capsys):
    assert main(["weights", "register", "remote", "--url", "http://127.0.0.1:9/x.pt"]) == 1
    assert "--network and --size" in capsys.readouterr().err
    args = ["--url", "http://127.0.0.1:9/x.pt", "--network", "hieradet_d_tiny", "--size", "64x96", "--num-classes", "4"]
    assert main(["weights", "register", "remote", *args]) == 0
    entry = catalog.resolve("remote")
    assert entry.resolution == (64, 96) and entry.num_classes == 4 and entry.url.endswith("/x.pt")


def test_layers_session_over_user_file_over_builtin(hierax_home, tiny_file):
    path, _ = tiny_file
    builtin = catalog.resolve("hieradet_d_small_dino-v2")
    hierax.register_weights(builtin.name, network="hieradet_d_tiny", resolution=64, path=path, persist=True)
    assert catalog.resolve(builtin.name).network == "hieradet_d_tiny"
    hierax.register_weights(builtin.name, network="hieradet_d_base", resolution=64, path=path)
    try:
        assert catalog.resolve(builtin.name).network == "hieradet_d_base"
        assert [e.name for e in catalog.list_weights()].count(builtin.name) == 1
    finally:
        catalog.unregister_weights(builtin.name)
    assert catalog.resolve(builtin.name).network == "hieradet_d_tiny"
    catalog.unregister_weights(builtin.name, persist=True)
    assert catalog.resolve(builtin.name) == builtin
    with pytest.raises(ModelNotFoundError, match="not in the user registry"):
        catalog.unregister_weights(builtin.name, persist=True)


def test_overwrite_false_refuses_a_taken_alias(hierax_home, tiny_file):
    path, _ = tiny_file
    with pytest.raises(ValueError, match="already registered for 'hieradet_small_dino-v2-inat21'"):
        hierax.register_weights(
            "other", network="hieradet_d_tiny", resolution=64, path=path, aliases=("hieradet_d_small_dino-v2-inat21",),
            overwrite=False,
        )  # fmt: skip
    with pytest.raises(HieraxError, match="sha256 must be 64"):
        hierax.register_weights("x", network="hieradet_d_tiny", resolution=64, path=path, sha256="abc")
    with pytest.raises(HieraxError, match="resolution sides"):
        hierax.register_weights("x", network="hieradet_d_tiny", resolution=0, path=path)


def test_malformed_registry_file_is_one_message(hierax_home, capsys):
    registry_path().parent.mkdir(parents=True)
    registry_path().write_text('{"weights": [{"name": "x"}]}')
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert str(registry_path()) in err and "fix or remove it" in err and len(err.splitlines()) == 1
    registry_path().write_text("not json")
    with pytest.raises(HieraxError, match="fix or delete it"):
        catalog.resolve("anything")


def test_a_network_name_is_not_weights(hierax_home, capsys):
    with pytest.raises(ModelNotFoundError, match="names a network") as err:
        hierax.load_pretrained_model("hieradet_d_tiny")
    assert "hierax train --network hieradet_d_tiny" in str(err.value) and "hierax models" in str(err.value)
    assert main(["info", "hieradet_d_tiny"]) == 1
    assert "names a network" in capsys.readouterr().err
