"""What reading a model file refuses, and says so in one line: malformed metadata fields (named), a training
state instead of a model, a backbone asked for species; and build_from_state's strict load and new heads."""

import pytest
import torch
from PIL import Image
from skimage import data

import hierax
from hierax.cli import main
from hierax.errors import CheckpointError, ModelNotFoundError, NoClassifierError
from hierax.models import create_model
from hierax.training.engine import TrainConfig
from hierax.training.supervised import FineTuneConfig, train_classifier
from hierax.weights.files import ModelInfo, read_checkpoint, require_classifier, write_checkpoint
from hierax.weights.load import build_from_state
from tests.conftest import TINY, inat_names
from tests.train_support import make_shapes


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    net = create_model("hieradet_d_tiny", 4, **TINY).eval()
    info = ModelInfo.create("hieradet_d_tiny", {n: i for i, n in enumerate(inat_names(4))}, 64, config=TINY)
    return net, info, write_checkpoint(tmp_path / "good.pt", net, info)


def _with_meta(path, out, **changes):
    raw = torch.load(path, weights_only=True)
    raw.update(changes)
    torch.save(raw, out)
    return out


BAD_FIELDS = [
    ("signature", {"input": [{"data_shape": [0, 3, 64, 64]}]}),
    ("signature", {"inputs": [{"data_shape": [0, 3, 0, 64]}], "outputs": [{"data_shape": [0, 4]}]}),
    ("class_to_idx", ["a", "b"]),
    ("class_to_idx", {"a": 0, "b": 0, "c": 2, "d": 3}),
    ("rgb_stats", {"mean": [0.5, 0.5]}),
    ("rgb_stats", {"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}),
    ("config", "depths=1"),
]


@pytest.mark.parametrize("field, value", BAD_FIELDS)
def test_a_malformed_field_is_a_checkpoint_error_naming_it(tmp_path, tiny, field, value):
    _, _, good = tiny
    bad = _with_meta(good, tmp_path / "bad.pt", **{field: value})
    with pytest.raises(CheckpointError, match=f"'{field}'"):
        read_checkpoint(bad)


def test_info_and_predict_name_the_field(tmp_path, tiny, capsys):
    _, _, good = tiny
    bad = _with_meta(good, tmp_path / "bad.pt", signature={"input": []})
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "malformed 'signature' field" in err and len(err.strip().splitlines()) == 1
    photo = tmp_path / "coffee.jpg"
    Image.fromarray(data.coffee()).save(photo)
    assert main(["predict", str(photo), "--model", str(bad), "-o", str(tmp_path / "p.csv"), "--workers", "0"]) == 1
    assert "malformed 'signature' field" in capsys.readouterr().err


def test_classes_must_match_the_classifier(tmp_path, tiny):
    _, _, good = tiny
    bad = _with_meta(good, tmp_path / "bad.pt", class_to_idx={"a": 0, "b": 1})
    with pytest.raises(CheckpointError, match="names 2 classes but the classifier has 4 outputs"):
        hierax.load_pretrained_model(bad)


def test_a_training_state_points_to_model_pt(tmp_path):
    root = make_shapes(tmp_path / "shapes", per_class=4, size=32, classes=2)
    options = FineTuneConfig(data=str(root), network="hieradet_d_tiny", size=(32, 32), model_config=TINY)
    run = tmp_path / "run"
    train_classifier(options, TrainConfig(output_dir=run, epochs=1, batch_size=8, num_workers=0))
    with pytest.raises(CheckpointError, match="is a training state") as err:
        hierax.load_pretrained_model(run / "training_state.pt")
    assert str(run / "model.pt") in str(err.value)
    net, info = hierax.load_pretrained_model(run, inference=True)  # a run's folder means its model.pt
    assert info.class_names == ["circle", "square"] and net(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
    with pytest.raises(ModelNotFoundError, match="folder without a model.pt"):
        hierax.load_pretrained_model(tmp_path / "shapes")


def test_require_classifier(tmp_path, tiny):
    net, info, _ = tiny
    require_classifier(info, "predict")
    backbone = create_model("hieradet_d_tiny", 0, **TINY)
    path = write_checkpoint(
        tmp_path / "backbone.pt", backbone, ModelInfo.create("hieradet_d_tiny", {}, 64, config=TINY)
    )
    _, back = hierax.load_pretrained_model(path)
    assert back.num_classes == 0
    with pytest.raises(NoClassifierError, match="cannot serve: this hieradet_d_tiny model is a backbone") as err:
        require_classifier(back, "serve")
    assert "hierax embed" in str(err.value) and "hierax train --init-from" in str(err.value)


def test_build_from_state_new_head_and_strictness(tiny):
    net, info, _ = tiny
    state = net.state_dict()
    same = build_from_state(state, info)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(same.eval()(x), net(x))
    other = build_from_state(state, info, num_classes=7)  # fine-tuning on other classes: a new head
    width = net.embedding_size
    assert other.classifier.weight.shape == (7, width) and torch.equal(other.pos_embed, net.pos_embed)
    backbone = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    assert build_from_state(backbone, info, num_classes=4).classifier.weight.shape == (4, width)
    with pytest.raises(CheckpointError, match="missing 2 tensors"):
        build_from_state({k: v for k, v in state.items() if not k.startswith("features.")}, info)
    with pytest.raises(CheckpointError, match="does not fit"):
        build_from_state(state, info, config={"embed_dim": 24})
