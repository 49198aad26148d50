"""`--model` takes a file path in every command that loads a model: relative, `~/...` (unexpanded when written
as --model=~/...), or a training run's folder (its model.pt)."""

import json

import pytest
import torch
from PIL import Image
from skimage import data

from hierax.cli import main
from hierax.models import create_model
from hierax.weights.files import ModelInfo, write_checkpoint
from tests.conftest import TINY, inat_names


@pytest.fixture
def workdir(tmp_path, monkeypatch, hierax_home):
    torch.manual_seed(0)
    net = create_model("hieradet_d_tiny", 4, **TINY)
    info = ModelInfo.create("hieradet_d_tiny", {n: i for i, n in enumerate(inat_names(4))}, 64, config=TINY)
    write_checkpoint(tmp_path / "models" / "tiny.pt", net, info)
    write_checkpoint(tmp_path / "home" / "tiny.pt", net, info)
    write_checkpoint(tmp_path / "runs" / "x" / "model.pt", net, info)
    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.jpg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HIERAX_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize("model", ["models/tiny.pt", "~/tiny.pt", "runs/x"])
def test_every_command_takes_a_path(workdir, model, capsys):
    assert main(["info", model, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_classes"] == 4
    common = ["--workers", "0", "--quiet"]
    assert main(["predict", "astronaut.jpg", f"--model={model}", "-o", "p.csv", *common]) == 0
    assert len((workdir / "p.csv").read_text().splitlines()) == 2
    assert main(["embed", "astronaut.jpg", "--model", model, "-o", "e.npy", *common]) == 0
    assert (workdir / "e.npy").is_file()
    assert main(["export", model, "-o", "t.ts"]) == 0
    assert (workdir / "t.ts").is_file()


def test_a_missing_path_says_so(workdir, capsys):
    assert main(["info", "models/nope.pt"]) == 1
    assert "No such checkpoint file: models/nope.pt" in capsys.readouterr().err
