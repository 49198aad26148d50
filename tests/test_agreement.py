"""compare_models and `hierax export --check`: agreement between a model and a candidate on real photos."""

import pytest
import torch

from hierax.cli import main
from hierax.errors import HieraxError
from hierax.inference.agreement import compare_models
from hierax.weights.files import read_checkpoint, write_checkpoint
from tests.data_fixtures import CLASS_NAMES, make_checkpoint
from tests.similar_support import real_photos


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, image in real_photos().items():
        image.resize((160, 120)).save(folder / f"{name}.jpg", quality=90)
    return folder


@pytest.fixture
def checkpoint(tmp_path):
    return make_checkpoint(tmp_path / "tiny.pt")


def reversed_classes(src, dst):
    """The same network with its classifier rows in reverse order, under the same class names: every top-1
    answer moves from class i to class n-1-i (never itself, as n is even)."""
    state, info = read_checkpoint(src)
    state = dict(state)
    for key in ("classifier.weight", "classifier.bias"):
        state[key] = state[key].flip(0)
    return write_checkpoint(dst, state, info)


def test_a_model_agrees_with_itself(checkpoint, photos, one_thread):
    result = compare_models(checkpoint, checkpoint, photos, workers=0)
    assert (result.images, result.top1, result.top5_overlap, result.max_prob_change) == (6, 1.0, 1.0, 0.0)
    assert result.changed == [] and result.errors == []
    assert result.reference_seconds > 0 and result.candidate_seconds > 0
    assert "top-1 100.0%" in result.summary()


def test_every_changed_answer_is_listed_with_both_classes(checkpoint, photos, tmp_path, one_thread):
    candidate = reversed_classes(checkpoint, tmp_path / "reversed.pt")
    result = compare_models(checkpoint, candidate, photos, batch_size=4, workers=0)
    assert result.top1 == 0.0 and len(result.changed) == 6
    assert result.top5_overlap == 1.0  # four classes: the top 5 holds them all, in any order
    for change in result.changed:
        assert CLASS_NAMES.index(change.candidate) == len(CLASS_NAMES) - 1 - CLASS_NAMES.index(change.reference)
        assert change.reference_prob == pytest.approx(change.candidate_prob, abs=1e-5)
    assert sorted(c.path.rsplit("/", 1)[1] for c in result.changed) == sorted(f"{n}.jpg" for n in real_photos())
    assert "changed:" in result.summary(shown=2) and "and 4 more changed" in result.summary(shown=2)


def test_unreadable_photos_are_reported_and_the_rest_compared(checkpoint, photos, one_thread):
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    result = compare_models(checkpoint, checkpoint, photos, workers=0)
    assert result.images == 6
    assert [p.rsplit("/", 1)[1] for p, _ in result.errors] == ["broken.jpg"]
    assert "failed:" in result.summary()


def test_models_with_other_classes_are_refused(checkpoint, photos, tmp_path):
    other = make_checkpoint(tmp_path / "other.pt", class_names=CLASS_NAMES[::-1])
    with pytest.raises(HieraxError, match="different classes"):
        compare_models(checkpoint, other, photos, workers=0)
    with pytest.raises(HieraxError, match="no images found"):
        compare_models(checkpoint, checkpoint, tmp_path / "nothing-here-*.jpg", workers=0)


def test_export_check_reports_an_int8_files_agreement(checkpoint, photos, tmp_path, capsys, one_thread):
    out = tmp_path / "tiny-int8.onnx"
    assert main(["export", str(checkpoint), "-o", str(out), "--quantize", "int8", "--check", str(photos)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}")
    assert "agreement with the reference on 6 photos" in printed and "img/s" in printed
    result = compare_models(checkpoint, out, photos, batch_size=1, workers=0)
    assert 0 < result.max_prob_change < 0.5  # int8 moves the probabilities, a little
    assert f"top-1 {result.top1:.1%}" in printed


def twin_classes(src, dst):
    """Classes 0 and 1 with classifier rows that differ by one part in 10^5, leaning (sign by sign) towards the
    photos' mean embedding, and classes 2 and 3 never chosen. float32 picks class 1 for some photos; a float16
    copy rounds the two rows to the same values, ties them, and picks class 0: a real precision loss that changes
    answers."""
    from hierax.transforms import classification_transform
    from hierax.weights.load import load_pretrained_model

    net, info = load_pretrained_model(src, inference=True)
    transform = classification_transform(info.size, info.rgb_stats)
    x = torch.stack([transform(image) for image in real_photos().values()])
    lean = net.embedding(x).mean(0).sign()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    w, b = state["classifier.weight"], state["classifier.bias"]
    w[0] = w[0].half().float()
    w[1] = w[0] + w[0].abs() * 1e-5 * lean
    w[2:] = 0
    b[:] = torch.tensor([10.0, 10.0, -1000.0, -1000.0])
    return write_checkpoint(dst, state, info)


def test_export_check_fails_below_the_floor_and_keeps_the_file(checkpoint, photos, tmp_path, capsys):
    twins = twin_classes(checkpoint, tmp_path / "twins.pt")
    floor = ["--check", str(photos), "--min-top1", "0.99"]
    same = tmp_path / "same.safetensors"
    assert main(["export", str(twins), "-o", str(same), *floor]) == 0
    assert "top-1 100.0%" in capsys.readouterr().out
    half = tmp_path / "half.safetensors"
    assert main(["export", str(twins), "-o", str(half), "--dtype", "float16", *floor]) == 1
    captured = capsys.readouterr()
    assert "changed:" in captured.out and f"{CLASS_NAMES[1]} (" in captured.out
    assert "is below --min-top1 99.0%" in captured.err and f"{half} is kept" in captured.err
    assert half.exists()
    assert main(["export", str(twins), "-o", str(tmp_path / "low.safetensors"), "--dtype", "float16", "--check",
                 str(photos), "--min-top1", "0"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "x.onnx"), "--min-top1", "0.9"]) == 1
    assert "--min-top1 needs --check" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "y.onnx"), *floor[:2], "--min-top1", "99"]) == 1
    assert "between 0 and 1" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "z.onnx"), "--check", str(tmp_path / "no*.jpg")]) == 1
    assert "no images found" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("x.onnx", "y.onnx", "z.onnx"))
