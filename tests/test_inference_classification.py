"""infer_image / infer_batch / classification_transform on real photos and every image mode."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from sklearn.datasets import load_sample_image

from hierax import classification_transform, get_size_from_signature
from hierax.errors import ImageDecodeError
from hierax.inference import classification
from hierax.inference.classification import infer_batch, infer_image, infer_stages
from hierax.models import create_model, fastpath
from hierax.transforms import DEFAULT_RGB_STATS
from hierax.weights.files import ModelInfo
from tests.conftest import TINY


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return create_model("hieradet_d_tiny", 6, **TINY).eval()


@pytest.fixture(scope="module")
def transform():
    return classification_transform((64, 64), DEFAULT_RGB_STATS)


def test_transform_matches_reference_steps():
    t = classification_transform((48, 64), {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    img = Image.fromarray(data.coffee())
    out = t(img)
    ref = np.asarray(img.resize((64, 48), Image.BICUBIC), dtype=np.float32) / 255.0
    ref = (ref - 0.5) / 0.25
    assert out.shape == (3, 48, 64) and out.dtype == torch.float32
    assert np.abs(out.permute(1, 2, 0).numpy() - ref).mean() < 0.02
    assert get_size_from_signature(ModelInfo.create("x", {}, (48, 64)).signature) == (48, 64)


def test_center_crop_and_simple_crop():
    img = Image.fromarray(data.astronaut())
    assert classification_transform(32, None, center_crop=0.5)(img).shape == (3, 32, 32)
    assert classification_transform((32, 40), None, simple_crop=True)(img).shape == (3, 32, 40)
    with pytest.raises(ValueError):
        classification_transform(32, None, center_crop=0)


@pytest.mark.parametrize("photo", ["chelsea", "coffee", "astronaut", "flower"])
def test_real_photos_path_pil_array_agree(tmp_path, net, transform, photo):
    arr = load_sample_image("flower.jpg") if photo == "flower" else getattr(data, photo)()
    path = tmp_path / f"{photo}.png"
    Image.fromarray(arr).save(path)
    p_path, _ = infer_image(net, str(path), transform)
    p_arr, _ = infer_image(net, arr, transform)
    p_tensor, _ = infer_image(net, torch.tensor(arr).permute(2, 0, 1), transform)
    p_pil, emb = infer_image(net, Image.open(path), transform, return_embedding=True)
    assert p_path.shape == (1, 6) and np.isclose(p_path.sum(), 1, atol=1e-5)
    assert np.allclose(p_path, p_arr, atol=1e-6) and np.allclose(p_path, p_tensor, atol=1e-6)
    assert np.allclose(p_path, p_pil, atol=2e-3)
    assert emb.shape == (1, net.embedding_size)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_every_mode_becomes_rgb(net, transform, mode):
    img = Image.fromarray(data.chelsea())
    converted = (
        img.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    )
    probs, _ = infer_image(net, converted, transform)
    assert probs.shape == (1, 6) and np.isfinite(probs).all()


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA"])
def test_the_transform_alone_takes_every_mode_as_infer_image_does(net, transform, mode):
    """The model card's `transform(Image.open(path))` on a PNG with alpha (or grey, palette, CMYK) gives the
    tensor infer_image uses for the same image."""
    converted = Image.fromarray(data.chelsea()).convert(mode)
    x = transform(converted)
    assert x.shape[0] == 3
    assert torch.allclose(x, transform(converted.convert("RGB")))
    direct = infer_batch(net, x.unsqueeze(0))[0]
    assert np.allclose(direct, infer_image(net, converted, transform)[0], atol=1e-5)


def test_exif_orientation_applied(tmp_path, net, transform):
    img = Image.fromarray(data.astronaut()[:, :400])
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    rotated = img.transpose(Image.Transpose.ROTATE_270)
    buf2 = io.BytesIO()
    rotated.save(buf2, "JPEG", quality=95)
    from hierax.data.images import decode_image

    a, b = decode_image(buf.getvalue()), decode_image(buf2.getvalue())
    assert a.shape == b.shape == (3, 400, 512)
    assert (a.float() - b.float()).abs().mean() < 3


def test_tta_and_batch(net, transform):
    x = torch.stack([transform(Image.fromarray(data.chelsea())), transform(Image.fromarray(data.coffee()))])
    plain, _ = infer_batch(net, x)
    tta, emb = infer_batch(net, x, tta=True, return_embedding=True)
    assert plain.shape == tta.shape == (2, 6) and emb.shape == (2, net.embedding_size)
    assert np.allclose(tta.sum(1), 1, atol=1e-5) and not np.allclose(plain, tta)
    single, _ = infer_batch(net, x[:1])
    assert np.allclose(single, plain[:1], atol=1e-5)
    bf16, _ = infer_batch(net, x, amp=True)
    assert np.abs(bf16 - plain).max() < 0.05


@pytest.mark.parametrize("native", [True, False])
def test_amp_warns_once_where_bf16_is_emulated(monkeypatch, caplog, net, native):
    """--amp on a CPU without native bf16 (AVX2-only x86) is an 8x slowdown: say so once, and still answer."""
    monkeypatch.setattr(classification, "native_half_dtypes", lambda: frozenset({torch.bfloat16} if native else ()))
    classification._warn_emulated_bf16.cache_clear()
    x = torch.randn(2, 3, 64, 64)
    plain, _ = infer_batch(net, x)
    with caplog.at_level("WARNING", logger="hierax"):
        for _ in range(2):
            bf16, _ = infer_batch(net, x, amp=True)
        infer_batch(net, x)
    warned = [r for r in caplog.records if "no native bfloat16" in r.getMessage()]
    assert len(warned) == (0 if native else 1)
    assert np.abs(bf16 - plain).max() < 0.05
    classification._warn_emulated_bf16.cache_clear()


def test_undecodable_image(tmp_path, net, transform):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not really a jpeg")
    with pytest.raises(ImageDecodeError, match="not an image"):
        infer_image(net, str(bad), transform)
    with pytest.raises(ImageDecodeError, match="not found"):
        infer_image(net, str(tmp_path / "missing.jpg"), transform)


def test_images_per_forward_keeps_the_first_stage_mlp_within_glibc_heap():
    with torch.device("meta"):
        small = create_model("hieradet_d_small", 10)

    def per_call(size: int, dtype=None, batch: int = 32, device: str = "cpu") -> int:
        return fastpath.images_per_forward(small, torch.empty(batch, 3, size, size, device=device), dtype)

    # hidden layer of 384 channels over a 56 x 56 (224 px) or 96 x 96 (384 px) grid, 4 or 2 bytes a value
    assert (per_call(224), per_call(384), per_call(224, torch.bfloat16), per_call(384, torch.bfloat16)) == (6, 2, 13, 4)
    assert per_call(224, batch=4) == 4 and per_call(1024, batch=4) == 1
    assert per_call(384, device="meta") == 32  # other devices take the whole batch
    with fastpath.fast_path(False):
        assert per_call(384) == 32
    assert fastpath.images_per_forward(torch.nn.Conv2d(3, 4, 1), torch.empty(32, 3, 384, 384)) == 32


def test_a_large_cpu_batch_runs_in_near_equal_parts_with_the_same_outputs(monkeypatch, net, transform):
    images = []
    hook = net.stem.register_forward_pre_hook(lambda _module, args: images.append(len(args[0])))
    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket(), load_sample_image("flower.jpg")]
    photos += [photo[: photo.shape[0] // 2] for photo in photos[:3]]  # and three halves: eight real photos
    x = torch.stack([transform(Image.fromarray(photo)) for photo in photos])
    try:
        whole, whole_emb = infer_batch(net, x, return_embedding=True)
        whole_stages = infer_stages(net, x, ["stage1", "stage4"])
        assert images == [8, 8]
        # three 64 px images of this net's first-stage MLP (16 x 16 tokens, 64 channels, fp32) per call
        monkeypatch.setattr(fastpath, "_CPU_ACTIVATION_MAX_BYTES", 3 * 16 * 16 * 64 * 4)
        images.clear()
        probs, emb = infer_batch(net, x, return_embedding=True)
        assert images == [3, 3, 2]
        np.testing.assert_allclose(probs, whole, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(emb, whole_emb, rtol=1e-5, atol=1e-6)
        images.clear()
        parts = infer_stages(net, x, ["stage1", "stage4"])
        assert images == [3, 3, 2]
        for got, want in zip(
            (parts[0], parts[1], *parts[2].values()), (whole_stages[0], whole_stages[1], *whole_stages[2].values())
        ):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        images.clear()
        infer_batch(net, x, tta=True)
        assert images == [3, 3, 2] * 5
        images.clear()
        infer_batch(net, x, amp=True)  # bf16 activations: half the bytes, six images a call
        assert images == [4, 4]
    finally:
        hook.remove()
