"""Checkpoint round-trips (.pt reference layout, .safetensors), SAM 2 / timm imports and bad-file errors."""

import pickle

import pytest
import torch

import hierax
from hierax.errors import CheckpointError, ModelNotFoundError
from hierax.models import create_model
from hierax.weights.convert import convert_state_dict
from hierax.weights.files import ModelInfo, read_checkpoint, write_checkpoint
from tests.conftest import TINY, inat_names


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    net = create_model("hieradet_d_tiny", 4, **TINY).eval()
    info = ModelInfo.create("hieradet_d_tiny", {n: i for i, n in enumerate(inat_names(4))}, (64, 96), config=TINY)
    return net, info


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip(tmp_path, tiny, suffix):
    net, info = tiny
    path = write_checkpoint(tmp_path / f"model{suffix}", net, info)
    state, back = read_checkpoint(path)
    assert back.class_to_idx == info.class_to_idx and back.signature == info.signature
    assert back.rgb_stats == info.rgb_stats and back.network == "hieradet_d_tiny"
    assert back.size == (64, 96) and back.file_format == suffix[1:]
    loaded, _ = hierax.load_pretrained_model(path, inference=True)
    x = torch.randn(2, 3, 64, 96)
    assert torch.equal(loaded(x), net(x))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_pt_layout_is_the_references(tmp_path, tiny):
    net, info = tiny
    path = write_checkpoint(tmp_path / "m.pt", net, info)
    raw = torch.load(path, weights_only=True)
    for key in ("state", "birder_version", "task", "signature", "class_to_idx", "rgb_stats", "config"):
        assert key in raw
    assert raw["signature"] == {"inputs": [{"data_shape": [0, 3, 64, 96]}], "outputs": [{"data_shape": [0, 4]}]}
    assert raw["task"] == "image_classification"
    assert set(raw["state"]) == set(net.state_dict())


def test_reads_reference_file_without_network_key(tmp_path, tiny):
    """A reference-written file has no `network`: the file name (or the shapes) decide."""
    net, info = tiny
    meta = {k: v for k, v in info.metadata().items() if k != "network"}
    torch.save({"state": net.state_dict(), **meta}, tmp_path / "hieradet_d_tiny_mine.pt")
    _, back = read_checkpoint(tmp_path / "hieradet_d_tiny_mine.pt")
    assert back.network == "hieradet_d_tiny"
    torch.save({"state": net.state_dict(), **meta}, tmp_path / "anything.pt")
    _, back = read_checkpoint(tmp_path / "anything.pt")
    assert back.network == "hieradet_d_tiny"


def test_never_unpickles_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        torch.save({"state": {}, "x": Evil()}, handle, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="never unpickles"):
        read_checkpoint(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_and_empty(tmp_path, tiny, suffix):
    net, info = tiny
    good = write_checkpoint(tmp_path / f"good{suffix}", net, info).read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        hierax.load_pretrained_model(tmp_path / f"cut{suffix}")
    (tmp_path / f"empty{suffix}").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        hierax.load_pretrained_model(tmp_path / f"empty{suffix}")


def test_other_architecture(tmp_path, tiny):
    net, info = tiny
    info.config = {}
    path = write_checkpoint(tmp_path / "m.pt", net, info)
    with pytest.raises(CheckpointError, match="does not (match|fit) network 'hieradet_d_small'"):
        hierax.load_pretrained_model(path, network="hieradet_d_small")
    del net.body.stage4[0]
    path = write_checkpoint(
        tmp_path / "m.pt", net, ModelInfo.create("hieradet_d_tiny", info.class_to_idx, 64, config=TINY)
    )
    with pytest.raises(CheckpointError, match="missing 14 tensors"):
        hierax.load_pretrained_model(path)


def test_unknown_name_suggests():
    with pytest.raises(ModelNotFoundError, match="Did you mean: hieradet_small_dino-v2-inat21"):
        hierax.load_pretrained_model("hieradet_small_dino-v2-inat")
    with pytest.raises(ModelNotFoundError, match="No such checkpoint file"):
        hierax.load_pretrained_model("/nonexistent/model.pt")


def _flat_names(net, naming):
    """The net's state dict renamed to SAM 2 or timm conventions (flat blocks.{i})."""
    out, i = {}, 0
    blocks = {}
    for s, stage in enumerate(net.body):
        for j in range(len(stage)):
            blocks[f"body.stage{s + 1}.{j}."] = f"blocks.{i}."
            i += 1
    mlp = {"sam2": ("mlp.layers.0.", "mlp.layers.1."), "timm": ("mlp.fc1.", "mlp.fc2.")}[naming]
    for key, value in net.state_dict().items():
        new = key.replace("pos_embed_win", "pos_embed_window").replace("stem.", "patch_embed.")
        for old, flat in blocks.items():
            new = new.replace(old, flat)
        new = new.replace("mlp.0.", mlp[0]).replace("mlp.3.", mlp[1])
        if naming == "sam2":
            if new.startswith(("features.", "classifier.")):
                continue
            new = "image_encoder.trunk." + new
        else:
            new = new.replace("features.0.", "head.norm.").replace("classifier.", "head.fc.")
        out[new] = value
    return out


@pytest.mark.parametrize("naming", ["sam2", "timm"])
def test_import_sam2_and_timm(tmp_path, naming):
    torch.manual_seed(1)
    src = create_model("hieradet_tiny", 0 if naming == "sam2" else 5).eval()
    state = _flat_names(src, naming)
    if naming == "sam2":
        state["sam_mask_decoder.foo.weight"] = torch.zeros(2)
        torch.save({"model": state}, tmp_path / "sam2_hiera_t.pt")
        path = tmp_path / "sam2_hiera_t.pt"
    else:
        torch.save(state, tmp_path / "timm_sam2_hiera.pt")
        path = tmp_path / "timm_sam2_hiera.pt"
    converted = convert_state_dict(torch.load(path, weights_only=True).get("model", state))
    assert set(converted) == set(src.state_dict())
    loaded, info = hierax.load_pretrained_model(path, network="hieradet_tiny", inference=True)
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(loaded.forward_stages(x), src.forward_stages(x)):
        assert torch.equal(a, b)


def test_new_size_dtype_device(tmp_path, tiny):
    net, info = tiny
    path = write_checkpoint(tmp_path / "m.pt", net, info)
    loaded, back = hierax.load_pretrained_model(path, new_size=(96, 160), dtype=torch.bfloat16, device="cpu")
    assert back.size == (96, 160) and back.signature["outputs"][0]["data_shape"] == [0, 4]
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters()) and loaded.training
    assert loaded(torch.randn(1, 3, 96, 160, dtype=torch.bfloat16)).shape == (1, 4)
