"""int8 dynamic quantisation of the Linear layers: speed-up and top-1 agreement with fp32, in one process.

hieradet_d_small with a 10,000-class head and random weights (no published weights can be downloaded here; a
random network's logits are close together, so its top-1 agreement is a pessimistic figure). Inputs: real photos
shipped with scikit-image / scikit-learn and generated smooth images, preprocessed like `hierax predict`.
Compares eager fp32 with torch's int8 dynamic quantisation, and ONNX Runtime fp32 with ONNX Runtime int8.

    python benchmarks/int8.py --size 224 --generated 24 --rounds 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hierax.export import export_model, load_exported, quantize_linear_int8, quantize_onnx
from hierax.models import create_model
from hierax.transforms import classification_transform
from hierax.weights.files import ModelInfo

NUM_CLASSES = 10_000


def photos(generated: int) -> tuple[list[Image.Image], list[Image.Image]]:
    """(real photos, generated smooth random images)."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    real = [Image.fromarray(a) for a in (data.chelsea(), data.coffee(), data.astronaut())]
    real += [Image.fromarray(load_sample_image(name)) for name in ("flower.jpg", "china.jpg")]
    rng = np.random.default_rng(0)
    fake = []
    for _ in range(generated):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        fake.append(Image.fromarray(small).resize((480, 360), Image.BICUBIC))
    return real, fake


def best_time(fn, x: torch.Tensor, rounds: int) -> float:
    fn(x)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--generated", type=int, default=24, help="number of generated images")
    parser.add_argument("--batch", type=int, default=8, help="batch size for timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = create_model("hieradet_d_small", NUM_CLASSES).eval()
    info = ModelInfo.create("hieradet_d_small", {f"class_{i}": i for i in range(NUM_CLASSES)}, args.size)
    transform = classification_transform(args.size, info.rgb_stats)
    real, fake = photos(args.generated)
    inputs = {"real": torch.stack([transform(img) for img in real])}
    inputs["generated"] = torch.stack([transform(img) for img in fake])

    with tempfile.TemporaryDirectory() as tmpdir:
        fp32_path = export_model(net, info, Path(tmpdir) / "fp32.onnx", dynamic_batch=True)
        int8_path = quantize_onnx(fp32_path, Path(tmpdir) / "int8.onnx")
        sizes = fp32_path.stat().st_size / 2**20, int8_path.stat().st_size / 2**20
        ort_fp32, _ = load_exported(fp32_path)
        ort_int8, _ = load_exported(int8_path)
        torch_int8 = quantize_linear_int8(net)
        pairs = {"torch eager": (net, torch_int8), "onnxruntime": (ort_fp32, ort_int8)}
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}px, random weights")
        print(f"ONNX file: fp32 {sizes[0]:.1f} MiB, int8 {sizes[1]:.1f} MiB")
        x = inputs["generated"][: args.batch]
        with torch.inference_mode():
            reference = {name: net(batch) for name, batch in inputs.items()}
            for label, (fp32, int8) in pairs.items():
                t32, t8 = best_time(fp32, x, args.rounds), best_time(int8, x, args.rounds)
                speeds = f"fp32 {len(x) / t32:.2f} img/s, int8 {len(x) / t8:.2f} img/s"
                print(f"\n{label}: {speeds}, speed-up {t32 / t8:.2f}x")
                for name, batch in inputs.items():
                    out = int8(batch)
                    top1 = (out.argmax(1) == reference[name].argmax(1)).float().mean().item()
                    top5 = np.mean(
                        [
                            len(set(a.tolist()) & set(b.tolist())) / 5
                            for a, b in zip(out.topk(5).indices, reference[name].topk(5).indices)
                        ]
                    )
                    cos = torch.nn.functional.cosine_similarity(out, reference[name]).mean().item()
                    print(
                        f"  {name:>9} ({len(batch)} images): top-1 agreement {top1:.1%}, top-5 overlap {top5:.1%},"
                        f" logit cosine {cos:.4f}"
                    )


if __name__ == "__main__":
    main()
