"""What the allocator settings are worth: forward images/s, page faults per pass and peak memory, glibc's default
against `hierax.runtime.keep_freed_memory` (kept) and the other contenders in CONTENDERS (thp: the transparent
huge pages that `hierax.runtime.fast_page_faults`, applied by the `hierax` command, chooses where it can).

The settings are process-wide and cannot be undone, so each contender runs in its own child process; the children
alternate (default, kept, ..., default, kept, ...) so that load from other processes hurts all alike, and each
reports its best pass. Printed: the best of each contender over all rounds, and the median per-round ratio to the
default.

    python benchmarks/allocator.py --pairs 3 --passes 2 --cases 384x8 --contenders kept thp
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

# Each contender's environment. thp: PyTorch backs blocks of 2 MiB and more with transparent huge pages (read once,
# at the first allocation); heap32 / heap1g: glibc serves blocks up to 32 MiB / 1 GiB from its heap and never trims
# it (heap1g is what keep_freed_memory() did before issue 18).
_THP = {"THP_MEM_ALLOC_ENABLE": "1"}
_HEAP32 = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=2147483647"}
_HEAP1G = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=2147483647"}
CONTENDERS = {
    "default": {},
    "kept": {},
    "thp": _THP,
    "heap32": _HEAP32,
    "heap32+thp": {**_HEAP32, **_THP},
    "heap1g": _HEAP1G,
}


def child(keep: bool, cases: list[str], passes: int) -> None:
    """One contender: time `passes` forwards per case and print one JSON line."""
    from hierax.models import create_model
    from hierax.runtime import keep_freed_memory

    applied = keep_freed_memory() if keep else False
    torch.manual_seed(0)
    net = create_model("hieradet_d_small", 1000).eval()
    out = {"applied": applied}
    for case in cases:
        size, batch = (int(v) for v in case.split("x"))
        x = torch.randn(batch, 3, size, size)
        best, faults = float("inf"), 0
        with torch.inference_mode():
            net(x)
            for _ in range(passes):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                net(x)
                seconds = time.perf_counter() - start
                if seconds < best:
                    best, faults = seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        out[case] = {"img_s": batch / best, "faults": faults}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4, help="alternating (default, kept) child rounds")
    parser.add_argument("--passes", type=int, default=3, help="timed forwards per case in each child")
    parser.add_argument("--cases", nargs="+", default=["224x8", "384x8", "384x1"], help="SIZExBATCH")
    parser.add_argument(
        "--contenders",
        nargs="+",
        default=["default", "kept"],
        choices=list(CONTENDERS),
        help="default: glibc's; kept: keep_freed_memory(); others: see CONTENDERS",
    )
    parser.add_argument("--child", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child == "kept", args.cases, args.passes)
        return
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads")
    results: dict[str, list[dict]] = {name: [] for name in ["default", *args.contenders]}
    for _ in range(args.pairs):
        for name in results:
            cmd = [sys.executable, __file__, "--child", name, "--passes", str(args.passes), "--cases", *args.cases]
            env = {**os.environ, **CONTENDERS[name]}
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    if not all(r["applied"] for r in results.get("kept", [{"applied": True}])):
        print("keep_freed_memory() was not applied here (not glibc, or malloc already tuned by the user)")
    print(f"{'case':>6} {'contender':<8} {'best img/s':>10} {'faults/pass':>12} {'median ratio':>13}")
    for case in args.cases:
        for name, runs in results.items():
            best = max(runs, key=lambda r: r[case]["img_s"])[case]
            ratios = [r[case]["img_s"] / d[case]["img_s"] for d, r in zip(results["default"], runs)]
            ratio = f"{statistics.median(ratios):.2f}x" if name != "default" else ""
            print(f"{case:>6} {name:<8} {best['img_s']:>10.2f} {best['faults']:>12} {ratio:>13}")
    for name, runs in results.items():
        print(f"peak RSS {name}: {max(r['peak_rss_mb'] for r in runs):.0f} MB")


if __name__ == "__main__":
    main()
