"""Acceptance: the model card's three snippets, with `birder` replaced by `hierax` and nothing else changed,
run against a random-weight checkpoint served from 127.0.0.1 under the registry entry's file name."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import hierax
from hierax.weights import catalog
from hierax.weights.files import ModelInfo, write_checkpoint


@pytest.fixture(scope="module")
def published_like_checkpoint(tmp_path_factory):
    """A hieradet_d_small with 10,000 classes and random weights, in the reference .pt layout."""
    torch.manual_seed(0)
    net = hierax.create_model("hieradet_d_small", 10000, layer_norm_eps=1e-5)
    names = [f"{i:05d}_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_sp{i}" for i in range(10000)]
    info = ModelInfo.create("hieradet_d_small", {n: i for i, n in enumerate(names)}, 384)
    path = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "hieradet_d_small_dino-v2-inat21.pt", net, info)
    return path.read_bytes()


@pytest.fixture
def card_model(published_like_checkpoint, file_server, hierax_home, tmp_path):
    entry = catalog.resolve("hieradet_small_dino-v2-inat21")
    file_server.files[entry.filename] = published_like_checkpoint
    hierax.register_weights(
        entry.name,
        aliases=entry.aliases,
        network=entry.network,
        config=entry.config,
        resolution=entry.resolution,
        url=file_server.url(entry.filename),
        sha256=hashlib.sha256(published_like_checkpoint).hexdigest(),
    )
    image_path = tmp_path / "image.jpeg"
    Image.fromarray(data.chelsea()).save(image_path)
    return str(image_path)


@pytest.mark.slow
def test_model_card_snippets(card_model):
    image = card_model
    from hierax.inference.classification import infer_image

    (net, model_info) = hierax.load_pretrained_model("hieradet_small_dino-v2-inat21", inference=True)
    size = hierax.get_size_from_signature(model_info.signature)
    transform = hierax.classification_transform(size, model_info.rgb_stats)
    (out, _) = infer_image(net, image, transform)
    assert out.shape == (1, 10000)
    assert np.isclose(out.sum(), 1.0, atol=1e-4)

    (out, embedding) = infer_image(net, image, transform, return_embedding=True)
    assert embedding.shape == (1, 768)

    image = Image.open(image)
    features = net.detection_features(transform(image).unsqueeze(0))
    assert [(k, tuple(v.size())) for k, v in features.items()] == [
        ("stage1", (1, 96, 96, 96)),
        ("stage2", (1, 192, 48, 48)),
        ("stage3", (1, 384, 24, 24)),
        ("stage4", (1, 768, 12, 12)),
    ]
    assert model_info.config["layer_norm_eps"] == 1e-5
    assert net.features[0].eps == 1e-5
    assert len(model_info.class_names) == 10000


def test_alias_resolves_to_same_entry():
    assert catalog.resolve("hieradet_d_small_dino-v2-inat21") is catalog.resolve("hieradet_small_dino-v2-inat21")
    assert catalog.resolve("hieradet_d_small_dino-v2-inat21-256px").resolution == (256, 256)
    for name in ("hieradet_d_small_dino-v2", "hieradet_d_small_dino-v2-imagenet12k", "hieradet_small_sam2_1"):
        assert catalog.resolve(name).sha256
