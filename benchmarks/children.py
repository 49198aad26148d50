"""Measuring a whole command in a child process, for the benchmarks that run hierax against the reference's scripts:
wall time, the main process's peak RSS (VmHWM) and the peak of the summed proportional set size (PSS: shared
pages split among their sharers) of its process tree (main + DataLoader workers), sampled every 0.2 s."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def _proc_kib(pid: int, field: str, table: str = "status") -> int:
    """A `/proc/PID/status` (or `smaps_rollup`) field in KiB (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/{table}") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(root: int) -> list[int]:
    """`root` and its living descendants (the DataLoader workers), from /proc."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in frontier]
        found += frontier
    return found


def run_measured(cmd: list[str], cwd: Path, env: dict) -> dict:
    """Run `cmd`; its wall time, peak memory (MiB: "main_mib", "tree_mib") and what it printed ("output").

    The output goes to a file, not a pipe, so that a chatty child never blocks on a full pipe."""
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        main_peak = tree_peak = 0
        while proc.poll() is None:
            main_peak = max(main_peak, _proc_kib(proc.pid, "VmHWM"))
            tree_peak = max(tree_peak, sum(_proc_kib(pid, "Pss", "smaps_rollup") for pid in _tree(proc.pid)))
            time.sleep(0.2)
        wall = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed: {output[-2000:]}")
    return {"wall": wall, "main_mib": main_peak / 1024, "tree_mib": tree_peak / 1024, "output": output}


def step_rates(name: str, run: dict, metrics: Path, warmup: int) -> list[float]:
    """Images/s of each logged step after the first `warmup`: hierax's `metrics` (metrics.jsonl), birder's log."""
    if name == "hierax":
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        rates = [r["images_per_s"] for r in records if r.get("split") == "train" and r["step"] > warmup]
    else:
        found = re.findall(r"iter (\d+)/\d+ .*?R: ([\d.]+) samples/s", run["output"])
        rates = [float(rate) for step, rate in found if int(step) > warmup]
    if not rates:
        raise SystemExit(f"{name} logged no step past the first {warmup}: {run['output'][-2000:]}")
    return rates


def compare_training(commands: dict[str, list[str]], root: Path, metrics: Path, warmup: int, rounds: int) -> None:
    """Run the "hierax" and "birder" training commands in alternating rounds in `root`; print the median images/s
    of their steps past `warmup`, their median wall time (start-up, epoch ends and validation included), their
    peak memory and the ratios. birder's child sees no PYTHONPATH."""
    env = dict(os.environ, TQDM_DISABLE="1")
    envs = {"hierax": env, "birder": {k: v for k, v in env.items() if k != "PYTHONPATH"}}
    rates: dict[str, list[float]] = {name: [] for name in commands}
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, cmd in commands.items():
            if name == "hierax":  # a new run each round: hierax refuses to start over an earlier run's state
                shutil.rmtree(metrics.parent, ignore_errors=True)
            run = run_measured(cmd, root, envs[name])
            rates[name] += step_rates(name, run, metrics, warmup)
            runs[name].append(run)
    speed = {name: statistics.median(values) for name, values in rates.items()}
    wall = {name: statistics.median(r["wall"] for r in done) for name, done in runs.items()}
    main_peak = {name: max(r["main_mib"] for r in done) for name, done in runs.items()}
    tree_peak = {name: max(r["tree_mib"] for r in done) for name, done in runs.items()}
    for name in runs:
        print(
            f"{name:6s}: {speed[name]:6.2f} images/s (median of {len(rates[name])} steps), "
            f"whole run {wall[name]:6.1f} s (median), "
            f"main peak RSS {main_peak[name]:6.0f} MiB, tree peak PSS {tree_peak[name]:6.0f} MiB"
        )
    print(
        f"hierax / birder: speed {speed['hierax'] / speed['birder']:.2f}x, "
        f"whole-run time {wall['hierax'] / wall['birder']:.2f}x, "
        f"main memory {main_peak['hierax'] / main_peak['birder']:.2f}x, "
        f"tree memory {tree_peak['hierax'] / tree_peak['birder']:.2f}x, load {os.getloadavg()[0]:.1f}"
    )
