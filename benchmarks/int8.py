"""int8 dynamic quantisation of the Linear layers against fp32 and bf16: speed and agreement with fp32, in one process.

hieradet_d_small with a 10,000-class head and random weights by default (no published weights can be downloaded
here; a random network's logits are close together, so its top-1 agreement is a pessimistic figure: read it
beside the logit cosine), or the trained model `--model` names (a registry name or a checkpoint; its classes and
preprocessing). Inputs: the real photos shipped with scikit-image / scikit-learn, the Tux Paint animal and plant
stamps (cut-outs, pasted on grey) when installed, `--images` (your own files, folders or globs) and generated
smooth images, preprocessed like `hierax predict`.
Contenders, timed in interleaved rounds (best kept) at each size and batch: eager fp32 (hierax's fast path), bf16
autocast, torch's int8 dynamic quantisation, ONNX Runtime fp32 and ONNX Runtime int8.

    python benchmarks/int8.py --sizes 224 384 --batches 1 8 --generated 200 --rounds 3
    python benchmarks/int8.py --model runs/ft/model.pt --images held-out/ --sizes 224
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hierax.data.images import load_image
from hierax.data.sources import find_images
from hierax.export import export_model, load_exported, quantize_linear_int8, quantize_onnx
from hierax.inference.classification import bf16_autocast
from hierax.models import create_model
from hierax.transforms import classification_transform
from hierax.weights.files import ModelInfo
from hierax.weights.load import load_pretrained_model

NUM_CLASSES = 10_000
STAMPS = Path("/usr/share/tuxpaint/stamps")


def photos(generated: int, yours: list[str] | None = None) -> dict[str, list]:
    """{"real": photos, "stamps": Tux Paint cut-outs on grey, "yours": the images `yours` names (decoded like
    `hierax predict`), "generated": smooth random images}."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    real = [Image.fromarray(a) for a in (data.chelsea(), data.coffee(), data.astronaut(), data.rocket())]
    real += [Image.fromarray(load_sample_image(name)) for name in ("flower.jpg", "china.jpg")]
    stamps = []
    for path in sorted(STAMPS.glob("animals/**/*.png")) + sorted(STAMPS.glob("plants/**/*.png")):
        with Image.open(path) as img:
            rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        stamps.append(Image.alpha_composite(canvas, rgba).convert("RGB"))
    rng = np.random.default_rng(0)
    fake = []
    for _ in range(generated):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        fake.append(Image.fromarray(small).resize((480, 360), Image.BICUBIC))
    mine = [load_image(path) for path in find_images(yours)] if yours else []
    return {"real": real, "stamps": stamps, "yours": mine, "generated": fake}


def agreement(out: torch.Tensor, ref: torch.Tensor) -> str:
    """Top-1 agreement, top-5 overlap and mean logit cosine of `out` against `ref`."""
    top1 = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    top5 = np.mean(
        [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(out.topk(5).indices, ref.topk(5).indices)]
    )
    cos = torch.nn.functional.cosine_similarity(out, ref).mean().item()
    return f"top-1 {top1:6.1%}, top-5 {top5:6.1%}, cosine {cos:.4f}"


def in_batches(fn, x: torch.Tensor, batch: int = 8) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch]).float() for i in range(0, len(x), batch)])


def run_size(net: torch.nn.Module, info: ModelInfo, images: dict, args: argparse.Namespace, tmp: Path) -> None:
    """Time every contender at info.size for each batch, then their agreement with eager fp32."""
    size = info.size[0]
    transform = classification_transform(size, info.rgb_stats)
    inputs = {name: torch.stack([transform(img) for img in imgs]) for name, imgs in images.items() if imgs}
    fp32_path = export_model(net, info, tmp / f"fp32_{size}.onnx", dynamic_batch=True)
    int8_path = quantize_onnx(fp32_path, tmp / f"int8_{size}.onnx")

    def bf16(x: torch.Tensor) -> torch.Tensor:
        with bf16_autocast(torch.device("cpu"), True):
            return net(x).float()

    contenders = {
        "torch fp32": net,
        "torch bf16 autocast": bf16,
        "torch int8 dynamic": quantize_linear_int8(net),
        "onnxruntime fp32": load_exported(fp32_path)[0],
        "onnxruntime int8": load_exported(int8_path)[0],
    }
    mib = fp32_path.stat().st_size / 2**20, int8_path.stat().st_size / 2**20
    print(f"\n{size} px (ONNX file fp32 {mib[0]:.1f} MiB, int8 {mib[1]:.1f} MiB), load {os.getloadavg()[0]:.1f}")
    with torch.inference_mode():
        for batch in args.batches:
            x = inputs["generated"][:batch]
            best = dict.fromkeys(contenders, float("inf"))
            for fn in contenders.values():
                fn(x)
            for _ in range(args.rounds):
                for name, fn in contenders.items():
                    # an untimed call first: ONNX Runtime's threads spin on after a run and would slow the next one
                    fn(x)
                    start = time.perf_counter()
                    fn(x)
                    best[name] = min(best[name], time.perf_counter() - start)
            base = best["torch fp32"]
            for name, seconds in best.items():
                print(f"  batch {batch}: {name:<20} {batch / seconds:7.2f} img/s  {base / seconds:5.2f}x torch fp32")
        print(f"  load {os.getloadavg()[0]:.1f}")
        reference = {name: in_batches(net, x) for name, x in inputs.items()}
        for name, fn in contenders.items():
            if name != "torch fp32":
                for group, x in inputs.items():
                    print(f"  {name:<20} {group:>9} ({len(x):3d}): {agreement(in_batches(fn, x), reference[group])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes timed")
    parser.add_argument("--generated", type=int, default=200, help="number of generated images")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--model", help="a trained model (registry name or checkpoint) instead of random weights")
    parser.add_argument("--images", nargs="+", help="your own images (files, folders, globs) as one more group")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        net, info = load_pretrained_model(args.model, inference=True)
    else:
        net = create_model("hieradet_d_small", NUM_CLASSES).eval()
        info = ModelInfo.create("hieradet_d_small", {f"class_{i}": i for i in range(NUM_CLASSES)}, 224)
    images = photos(args.generated, args.images)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model or 'random weights'}, "
        f"{info.network}, {info.num_classes} classes; " + ", ".join(f"{len(v)} {k}" for k, v in images.items())
    )
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            run_size(net, info.with_size(size), images, args, Path(tmp))


if __name__ == "__main__":
    main()
