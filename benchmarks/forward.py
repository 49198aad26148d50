"""hieradet_d_small forward throughput, side by side with the reference implementations, in one process.

For each input size, batch size and dtype it times, interleaved round by round (best round kept, so other load
on a shared machine hurts every contender alike):
- `hierax`: the eager model with its fast paths (cached position embedding; on CPU, Linear layers through
  oneDNN with GELU fused and autocast's weight cast kept, and in bf16 attention as two matmuls and a softmax
  instead of the fused kernel);
- `hierax-plain`: the same model on the plain path (fused attention kernel, position embedding recomputed each
  call, Linear layers through ATen's default), i.e. the code before the fast paths;
- `hierax-bf16w` (bf16 only): weights and activations in bf16 instead of autocast;
- `hierax-compile`, `hierax-bf16w-c` (--compile): `--backend inductor`'s `CompiledNet` of the eager model and of
  the bf16-weights one (torch.compile of the plain modules, with inductor's freezing on CPU: weights become
  constants, prepacked GEMMs with fused epilogues);
- `birder` (hieradet_d_small) and `timm` (sam2_hiera_small) when importable (install them in a separate
  virtualenv, never into hierax's environment).
bf16 means autocast unless the name says otherwise. It also measures the machine's GEMM peak (square fp32 and
bf16 matmuls) and prints each result as a fraction of that peak, using the model's FLOPs (convolution, linear
layers and attention matmuls, counted by torch's FlopCounterMode).

    python benchmarks/forward.py                       # CPU, 224/256/384, batch 1 and 8, fp32 and bf16
    python benchmarks/forward.py --device cuda --compile --channels-last --batches 1 32
    python benchmarks/forward.py --profile 384         # where the time goes, one forward at 384
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from hierax.models import create_model, fastpath
from hierax.models.compiled import CompiledNet

NUM_CLASSES = 1000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_description() -> str:
    """Threads, vector instruction set, and the dtypes that run natively: the facts that pick hierax's kernels."""

    def names(dtypes: frozenset) -> str:
        return ", ".join(sorted(str(dt).removeprefix("torch.") for dt in dtypes)) or "none"

    return (
        f"CPU, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()},"
        f" native half dtypes: {names(fastpath.native_half_dtypes())}, oneDNN Linear: {names(fastpath.linear_dtypes())}"
    )


def gemm(dtype: torch.dtype, device: torch.device) -> tuple[Callable, float]:
    """A square GEMM (2048 on CPU, 8192 on CUDA) as a contender, and its FLOPs. Timed in the same rounds as the
    models, its best round is the GEMM peak the models are compared with under the same load. It runs through
    hierax's Linear, so it is the GEMM hierax picks for this CPU (oneDNN with AVX-512, ATen's BLAS on AVX2)."""
    n = 8192 if device.type == "cuda" else 2048
    layer = fastpath.Linear(n, n, bias=False).to(device, dtype).eval()
    a = torch.randn(n, n, device=device, dtype=dtype)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return layer(a)

    return run, 2.0 * n**3


def model_flops(net: torch.nn.Module, size: int) -> float:
    """FLOPs of one image at size x size, counted on ATen's ops (attention through its two-matmul form)."""
    ctx = fastpath.fast_path(linear_dtypes=(), matmul_attention=True)
    with ctx, FlopCounterMode(display=False) as counter, torch.no_grad():
        net.cpu().float()(torch.randn(1, 3, size, size))
    return float(counter.get_total_flops())


def reference_models(size: int) -> dict[str, torch.nn.Module]:
    """birder's hieradet_d_small and timm's sam2_hiera_small, for those importable."""
    nets = {}
    try:
        from birder.model_registry import registry

        nets["birder"] = registry.net_factory("hieradet_d_small", NUM_CLASSES, size=(size, size))
    except ImportError:
        pass
    try:
        import timm

        nets["timm"] = timm.create_model("sam2_hiera_small", num_classes=NUM_CLASSES)
    except (ImportError, RuntimeError):
        pass
    return nets


def contenders(args, size: int, dtype: str, device: torch.device) -> dict[str, Callable]:
    """name -> callable(x) for one (size, dtype) case; every model has the same weights where names match."""
    torch.manual_seed(0)
    net = create_model("hieradet_d_small", NUM_CLASSES).eval().to(device)
    refs = {} if args.no_reference else reference_models(size)
    if "birder" in refs:
        net.load_state_dict(refs["birder"].state_dict())
    amp = dtype == "bf16"

    def run(model, plain=False, autocast=amp):
        def call(x):
            ctx = fastpath.fast_path(False) if plain else contextlib.nullcontext()
            with torch.inference_mode(), ctx, torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                return model(x)

        return call

    out = {"hierax": run(net), "hierax-plain": run(net, plain=True)}
    if amp:
        bf16 = create_model("hieradet_d_small", NUM_CLASSES).eval().to(device, torch.bfloat16)
        bf16.load_state_dict(net.state_dict())
        bf16_run = run(bf16, autocast=False)
        out["hierax-bf16w"] = lambda x: bf16_run(x.bfloat16())
    if args.compile:
        # what `--backend inductor` runs: the plain modules compiled, weights frozen into constants on CPU
        out["hierax-compile"] = run(CompiledNet(copy.deepcopy(net)))
        if amp:
            bf16_compiled = run(CompiledNet(copy.deepcopy(bf16)), autocast=False)
            out["hierax-bf16w-c"] = lambda x: bf16_compiled(x.bfloat16())
    for name, ref in refs.items():
        out[name] = run(ref.eval().to(device))
    return out


def time_case(fns: dict[str, Callable], x: torch.Tensor, rounds: int, min_time: float) -> dict[str, float]:
    """Best seconds per call of each contender, interleaving the contenders round by round."""
    device = x.device
    iters = {}
    for name, fn in fns.items():
        fn(x)
        fn(x)
        sync(device)
        start = time.perf_counter()
        fn(x)
        sync(device)
        iters[name] = max(1, int(min_time / max(time.perf_counter() - start, 1e-6)))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(iters[name]):
                fn(x)
            sync(device)
            best[name] = min(best[name], (time.perf_counter() - start) / iters[name])
    return best


def profile(size: int, batch: int, dtype: str, device: torch.device) -> None:
    """Print the PyTorch profiler's top operators for one hierax forward (fast path and plain path)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    net = create_model("hieradet_d_small", NUM_CLASSES).eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for label, ctx in (("fast paths", contextlib.nullcontext()), ("plain path", fastpath.fast_path(False))):
        with torch.inference_mode(), ctx, torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bf16"):
            net(x)
            with torch_profile(activities=activities) as prof:
                net(x)
                sync(device)
        print(f"\n== {label}: {size}px batch {batch} {dtype} ==")
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=14))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 256, 384])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds; the best is kept")
    parser.add_argument("--min-time", type=float, default=0.0, help="least seconds per contender per round")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of hierax")
    parser.add_argument("--channels-last", action="store_true", help="feed channels-last input tensors")
    parser.add_argument("--no-reference", action="store_true", help="skip birder and timm")
    parser.add_argument("--profile", type=int, metavar="SIZE", help="profile one forward at SIZE and exit")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.profile:
        for dtype in args.dtypes:
            profile(args.profile, args.batches[0], dtype, device)
        return

    name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_description()
    print(f"torch {torch.__version__}, {name}")
    flops = {size: model_flops(create_model("hieradet_d_small", NUM_CLASSES).eval(), size) for size in args.sizes}
    print("model GFLOPs per image: " + ", ".join(f"{s}px {f / 1e9:.2f}" for s, f in flops.items()))
    gemms = {"fp32": gemm(torch.float32, device), "bf16": gemm(torch.bfloat16, device)}
    header = f"{'size':>4} {'batch':>5} {'dtype':>5} {'contender':<15} {'img/s':>8} {'GFLOP/s':>8} {'% peak':>7}"
    print(f"\n{header} {'vs birder':>9} {'vs timm':>8}")
    best_peak = dict.fromkeys(gemms, 0.0)
    for size in args.sizes:
        for dtype in args.dtypes:
            fns = contenders(args, size, dtype, device)
            fns["gemm-peak"] = gemms[dtype][0]
            for batch in args.batches:
                x = torch.randn(batch, 3, size, size, device=device)
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                best = time_case(fns, x, args.rounds, args.min_time)
                peak = gemms[dtype][1] / best.pop("gemm-peak")
                best_peak[dtype] = max(best_peak[dtype], peak)
                for contender, seconds in best.items():
                    achieved = flops[size] * batch / seconds
                    ratios = [f"{best[ref] / seconds:.2f}x" if ref in best else "-" for ref in ("birder", "timm")]
                    print(
                        f"{size:>4} {batch:>5} {dtype:>5} {contender:<15} {batch / seconds:>8.2f}"
                        f" {achieved / 1e9:>8.1f} {100 * achieved / peak:>6.1f}% {ratios[0]:>9} {ratios[1]:>8}",
                        flush=True,
                    )
                print(f"{'':>16} {'gemm-peak':<15} {'':>8} {peak / 1e9:>8.1f}", flush=True)
    print("best GEMM peak of the run: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in best_peak.items() if v))


if __name__ == "__main__":
    main()
