"""HieraDet behaviour beyond parity: names, parameter counts, any input size, heads, checkpointing."""

import subprocess
import sys

import pytest
import torch

from hierax.errors import ModelNotFoundError
from hierax.models import NETWORK_CONFIGS, create_model, list_networks
from tests.conftest import DATA, TINY


def test_state_dict_matches_reference_listing():
    net = create_model("hieradet_d_small", 10000)
    lines = [
        line.split("\t")
        for line in (DATA / "hieradet_small_state_dict.txt").read_text().splitlines()
        if not line.startswith("#")
    ]
    expected = {name: tuple(int(x) for x in shape.strip("()").split(",") if x.strip()) for name, shape in lines}
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == expected
    assert sum(p.numel() for p in net.parameters()) == 41_638_864
    assert sum(p.numel() for n, p in net.named_parameters() if not n.startswith("classifier")) == 33_948_864


def test_family_is_complete():
    for size in ("tiny", "small", "base", "base_plus", "large"):
        assert f"hieradet_{size}" in list_networks() and f"hieradet_d_{size}" in list_networks()
    with pytest.raises(ModelNotFoundError, match="Did you mean"):
        create_model("hieradet_smal")
    with pytest.raises(ModelNotFoundError, match="Bad config"):
        create_model("hieradet_small", depth=3)


def test_networks_are_listed_without_torch():
    """hierax.models and its configs import no torch (listing networks must start fast). hierax's own __init__
    is skipped here (found, not run): its imports are the CLI's business, this checks the models package's."""
    code = (
        "import importlib.util, sys\n"
        "sys.modules['hierax'] = importlib.util.module_from_spec(importlib.util.find_spec('hierax'))\n"
        "import hierax.models, hierax.models.configs\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(len(hierax.models.list_networks()), hierax.models.NETWORK_CONFIGS['hieradet_small'].num_parameters())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(len(list_networks())), "33948864"]


def _built_parameters(network: str, num_classes: int, **config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(network, num_classes, **config).parameters())


@pytest.mark.parametrize("num_classes", [0, 10])
def test_parameter_counts_from_configs_match_the_built_networks(num_classes):
    for network in list_networks():
        assert NETWORK_CONFIGS[network].num_parameters(num_classes) == _built_parameters(network, num_classes)
    changed = dict(embed_dim=24, mlp_ratio=3.0, pos_embed_size=(5, 6))
    cfg = NETWORK_CONFIGS["hieradet_d_tiny"].updated(**changed)
    assert cfg.num_parameters(3) == _built_parameters("hieradet_d_tiny", 3, **changed)


@pytest.mark.parametrize("network", ["hieradet_d_small", "hieradet_small"])
@pytest.mark.parametrize("hw", [(200, 200), (250, 330), (383, 383), (512, 384)])
def test_any_input_size(network, hw):
    torch.manual_seed(0)
    net = create_model(network, 5, depths=(1, 2, 2, 1)).eval()
    x = torch.randn(1, 3, *hw)
    with torch.inference_mode():
        feats = net.detection_features(x)
        logits = net(x)
    h, w = -(-hw[0] // 4), -(-hw[1] // 4)
    expected = []
    for dim in (96, 192, 384, 768):
        expected.append((1, dim, h, w))
        h, w = h // 2, w // 2
    assert [tuple(f.shape) for f in feats.values()] == expected
    assert logits.shape == (1, 5) and torch.isfinite(logits).all()


def test_pos_embed_window_extends_and_crops():
    net = create_model("hieradet_d_tiny", 0, **TINY)
    with torch.no_grad():
        net.pos_embed.zero_()
    pos = net.position_embedding(13, 21)[0].permute(2, 0, 1)
    win = net.pos_embed_win[0]
    assert torch.equal(pos[:, :8, :8], win) and torch.equal(pos[:, 8:13, 16:21], win[:, :5, :5])


def test_heads_and_reset():
    net = create_model("hieradet_d_tiny", 4, **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    emb = net.embedding(x)
    assert emb.shape == (2, net.embedding_size) and torch.allclose(net.classify(emb), net(x), atol=1e-6)
    feats = net.forward_features(x)
    assert torch.allclose(net.forward_head(feats, pre_logits=True), emb)
    net.reset_classifier(7)
    assert net(x).shape == (2, 7)
    net.reset_classifier(0)
    assert net(x).shape == (2, net.embedding_size)


def test_grad_checkpointing_same_grads():
    torch.manual_seed(0)
    net = create_model("hieradet_d_tiny", 3, drop_path_rate=0.0, **TINY)
    x = torch.randn(2, 3, 64, 64)
    net(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    net.set_grad_checkpointing(True)
    net(x).sum().backward()
    for n, p in net.named_parameters():
        assert torch.allclose(p.grad, plain[n], atol=1e-6), n


def test_layer_norm_eps_is_config():
    net = create_model("hieradet_d_tiny", 2, layer_norm_eps=1e-5, **TINY)
    assert all(m.eps == 1e-5 for m in net.modules() if isinstance(m, torch.nn.LayerNorm))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stem_returns_a_contiguous_grid_equal_to_the_permuted_convolution(dtype):
    """The stem's (B, H, W, C) grid is contiguous (stage 1 would otherwise run on strided views) and equals the
    NCHW convolution permuted, in value."""
    net = create_model("hieradet_d_tiny", 0, **TINY).to(dtype)
    x = torch.randn(2, 3, 70, 90, dtype=dtype)
    with torch.no_grad():
        grid = net.stem(x)
        reference = net.stem.proj(x).permute(0, 2, 3, 1)
    assert grid.is_contiguous() and grid.shape == (2, 18, 23, net.config.embed_dim)
    assert torch.allclose(grid, reference, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
