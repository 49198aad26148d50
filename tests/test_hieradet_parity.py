"""Parity with the reference implementation's outputs (hieradet_reference.npz) under the fixed fill rule."""

import numpy as np
import pytest
import torch

from hierax.models import create_model
from tests.conftest import fill_reference

CASES = ["d_small_384", "d_small_256", "d_small_224x320", "small_384", "d_tiny_224"]


@pytest.mark.parametrize("case", CASES)
def test_reference_parity(case, reference_npz):
    arrays, meta = reference_npz
    info = meta[case]
    net = create_model(info["network"], info["num_classes"], layer_norm_eps=info["layernorm_eps"]).eval()
    assert sum(p.numel() for p in net.parameters()) == info["num_params"]
    assert len(net.state_dict()) == info["state_dict_keys"]
    fill_reference(net)
    x = torch.from_numpy(arrays[f"{case}/input"].astype(np.float32))
    with torch.inference_mode():
        logits = net(x).numpy()
        emb = net.embedding(x).numpy()
        feats = net.detection_features(x)
    assert np.abs(logits - arrays[f"{case}/logits"]).max() <= 1e-4
    assert np.abs(emb - arrays[f"{case}/embedding"]).max() <= 1e-4
    for stage, t in feats.items():
        assert list(t.shape) == arrays[f"{case}/{stage}/shape"].tolist()
        sampled = t.reshape(-1)[torch.from_numpy(arrays[f"{case}/{stage}/index"])].numpy()
        assert np.abs(sampled - arrays[f"{case}/{stage}/values"]).max() <= 1e-3
        assert abs(t.mean().item() - float(arrays[f"{case}/{stage}/mean"])) <= 1e-4
