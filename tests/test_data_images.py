"""decode_image: every supported format, and a stable reason code for every kind of bad input."""

import io

import pytest
import torch
from PIL import Image, ImageFile
from skimage import data

from hierax.data.images import decode_image, load_image
from hierax.errors import ImageDecodeError


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_formats_decode_to_rgb_uint8(fmt):
    photo = Image.fromarray(data.chelsea())
    out = decode_image(_encode(photo, fmt))
    assert out.shape == (3, 300, 451) and out.dtype == torch.uint8
    lossless = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()
    tolerance = 1 if fmt in ("PNG", "BMP", "TIFF") else 40
    assert (out.float() - lossless).abs().mean() < tolerance


def test_bad_inputs_have_reasons(tmp_path):
    photo = Image.fromarray(data.coffee())
    jpeg, png = _encode(photo, "JPEG"), _encode(photo, "PNG")
    cases = {
        "empty": b"",
        "truncated": jpeg[: len(jpeg) // 2],
        "not_an_image": b"<html>definitely not a photo</html>" * 4,
        "decompression_bomb": _encode(Image.new("1", (12000, 12000)), "PNG"),
        "too_small": _encode(Image.new("RGB", (1, 1)), "PNG"),
    }
    for reason, payload in cases.items():
        with pytest.raises(ImageDecodeError) as err:
            decode_image(payload)
        assert err.value.reason == reason, (reason, str(err.value))
    with pytest.raises(ImageDecodeError) as err:
        decode_image(png[: len(png) - 200])
    assert err.value.reason == "truncated"
    with pytest.raises(ImageDecodeError) as err:
        decode_image(tmp_path / "missing.jpg")
    assert err.value.reason == "not_found"


def test_truncated_files_are_refused_whatever_pillows_global_says(monkeypatch):
    """Another library in the process (MegaDetector's, on import) may set Pillow's LOAD_TRUNCATED_IMAGES."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    photo = Image.fromarray(data.coffee())
    for fmt in ("JPEG", "PNG"):
        payload = _encode(photo, fmt)
        with pytest.raises(ImageDecodeError) as err:
            decode_image(payload[: len(payload) // 2])
        assert err.value.reason == "truncated", fmt
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_load_image_inputs():
    arr = data.astronaut()
    assert torch.equal(load_image(arr), torch.from_numpy(arr).permute(2, 0, 1))
    assert load_image(arr[:, :, 0]).shape == (3, 512, 512)
    assert load_image(arr.astype("float32") / 255.0).dtype == torch.uint8
    with pytest.raises(ImageDecodeError, match="not an HxW"):
        load_image(arr[None])
    with pytest.raises(ImageDecodeError, match="unsupported image input"):
        load_image(42)
