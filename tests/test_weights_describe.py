"""`hierax info NAME` for a name whose file is not cached, and `hierax models`: the registry's facts, offline and
without torch; the parameter counts they show are checked against real builds."""

import json
import os
import subprocess
import sys

import torch

from hierax.models import create_model, list_networks
from hierax.weights.catalog import resolve
from hierax.weights.describe import describe, parameter_count


def _run(code, home):
    env = {**os.environ, "HIERAX_HOME": str(home), "HIERAX_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_parameter_counts_are_the_builds():
    for network in list_networks():
        with torch.device("meta"):
            net = create_model(network, 7)
        assert parameter_count(network, 7) == sum(p.numel() for p in net.parameters()), network
    assert parameter_count("no_such_network") is None and parameter_count("hieradet_d_tiny", None) is None


def test_registry_counts_match_the_published_model_cards():
    """The cards say 41.6 M parameters for the 10,000-class inat21 files and 43.0 M for imagenet12k's 11,821."""
    inat = resolve("hieradet_small_dino-v2-inat21")
    assert inat.num_classes == 10000 and round(parameter_count(inat.network, inat.num_classes) / 1e6, 1) == 41.6
    in12k = resolve("hieradet_d_small_dino-v2-imagenet12k")
    assert round(parameter_count(in12k.network, in12k.num_classes) / 1e6, 1) == 43.0
    assert resolve("hieradet_d_small_dino-v2").num_classes == 0 and resolve("hieradet_small_sam2_1").num_classes == 0


def test_info_on_an_uncached_name_offline(hierax_home, capsys):
    from hierax.cli import main

    got = describe("hieradet_small_dino-v2-inat21")
    assert got["cached"] is False and got["network"] == "hieradet_d_small" and got["input_size"] == [384, 384]
    assert got["num_classes"] == 10000 and got["file"] == "hieradet_d_small_dino-v2-inat21.pt"
    assert got["path"] == str(hierax_home / "weights" / "hieradet_d_small_dino-v2-inat21.pt")
    assert "hierax weights download hieradet_small_dino-v2-inat21" in got["note"]
    assert main(["info", "hieradet_d_small_dino-v2"]) == 0
    out = capsys.readouterr().out
    assert "num_classes: 0" in out and "not cached" in out and "224, 224" in out


def test_info_and_models_do_not_import_torch(hierax_home):
    code = (
        "import sys\nfrom hierax.cli import main\n"
        "assert main(['info', 'hieradet_small_sam2_1']) == 0\nassert main(['models', '--json']) == 0\n"
        "print('torch imported:', 'torch' in sys.modules)"
    )
    result = _run(code, hierax_home)
    assert result.returncode == 0, result.stderr
    assert "not cached" in result.stdout and result.stdout.strip().endswith("torch imported: False")


def test_models_json_lists_classes_and_cache_state(hierax_home, capsys):
    from hierax.cli import main

    assert main(["models", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in table["weights"]}
    assert rows["hieradet_d_small_dino-v2-imagenet12k"]["num_classes"] == 11821
    assert not any(row["cached"] for row in rows.values())
    assert {"network": "hieradet_d_small", "params_m": 33.9} in table["networks"]
