"""Load test of `hierax serve` on loopback: latency, throughput and server memory under concurrent clients.

Starts the real server (`python -m hierax serve`) in a subprocess with a random-weight model saved to a
temporary checkpoint (or --model), then:
1. the load run: --concurrency clients send --requests requests (every 10th a truncated JPEG that must get 422,
   the rest scikit-image's chelsea that must get 200); prints errors, p50/p95 latency, throughput and the
   server's resident memory before and after. Exits 1 on any unexpected answer.
2. the scaling table: throughput at 1, 8 and 32 concurrent clients, with micro-batching (--max-batch) and
   without (--max-batch 1), as ratios against one request at a time (1 client, no batching).
3. the open-network options: throughput at 8 clients with API keys, a rate limit no client reaches and JSON
   access logs on, as a ratio against the same server without them.
With --max-queue N the load run's server sheds load: 503 answers (with Retry-After) are counted as shed, with
their own latency, instead of as errors.

    python benchmarks/serve_load.py                      # tiny network, CPU
    python benchmarks/serve_load.py --max-queue 4        # a bounded queue under 32 clients
    python benchmarks/serve_load.py --network hieradet_d_small --size 384 --classes 10000 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_checkpoint(folder: Path, network: str, size: int, classes: int, tiny: bool) -> Path:
    """A random-weight checkpoint whose classes are iNat21-style 8-part names."""
    import torch

    from hierax.models import create_model
    from hierax.weights.files import ModelInfo, write_checkpoint

    config = {"depths": [1, 1, 1, 1], "embed_dim": 16} if tiny else {}
    torch.manual_seed(0)
    net = create_model(network, classes, **config)
    names = {
        f"{i:05d}_Animalia_Chordata_Aves_Order{i % 7}_Family{i % 31}_Genus{i % 97}_species{i}": i
        for i in range(classes)
    }
    return write_checkpoint(folder / "bench.safetensors", net, ModelInfo.create(network, names, size, config=config))


class Server:
    """`python -m hierax serve` in a subprocess, waited for until /healthz answers."""

    def __init__(self, model: str, max_batch: int, device: str, max_wait_ms: float, extra: list[str] = ()) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "hierax",
            "serve",
            "--model",
            model,
            "--port",
            str(self.port),
            "--max-batch",
            str(max_batch),
            "--max-wait-ms",
            str(max_wait_ms),
            "--device",
            device,
            *extra,
        ]
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=self.log, env={**os.environ, "HIERAX_OFFLINE": "1"}
        )
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start within 300 s")
            time.sleep(0.2)

    def rss(self) -> float:
        return _rss_mib(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def drive(
    url: str, good: bytes, bad: bytes | None, requests: int, concurrency: int, headers: dict | None = None
) -> dict:
    """Send `requests` uploads from `concurrency` clients; latencies of the good ones, of the shed ones (503 with
    Retry-After) and unexpected answers."""
    latencies: list[float] = []
    shed: list[float] = []
    server_side: list[dict[str, float]] = []
    errors: list[str] = []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(http: httpx.AsyncClient) -> None:
        for i in counter:
            is_bad = bad is not None and i % 10 == 9
            body, expected = (bad, 422) if is_bad else (good, 200)
            start = time.perf_counter()
            try:
                response = await http.post(
                    "/v1/classify", files={"file": ("photo.jpg", body, "image/jpeg")}, headers=headers
                )
                status = response.status_code
            except httpx.HTTPError as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            if status == 503 and response.headers.get("retry-after"):
                shed.append(time.perf_counter() - start)
            elif status != expected:
                errors.append(f"HTTP {status} (expected {expected}): {response.text[:200]}")
            elif not is_bad:
                latencies.append(time.perf_counter() - start)
                timing = (part.split(";dur=") for part in response.headers.get("server-timing", "").split(", "))
                server_side.append({stage: float(ms) for stage, ms in timing})

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        start = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    stages = {stage: np.array([t[stage] for t in server_side]) for stage in ("upload", "decode", "infer")}
    in_server = sum(stages.values())
    shed_ms = np.array(shed) * 1000
    return {
        "requests": requests,
        "wall": wall,
        "throughput": requests / wall,
        "errors": errors,
        "shed": len(shed),
        "shed_p50": float(np.percentile(shed_ms, 50)) if len(shed) else float("nan"),
        "shed_p95": float(np.percentile(shed_ms, 95)) if len(shed) else float("nan"),
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "server_p50": float(np.percentile(in_server, 50)),
        "server_p95": float(np.percentile(in_server, 95)),
        "stage_p50": {k: float(np.percentile(v, 50)) for k, v in stages.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint path or registry name (default: a random-weight model)")
    parser.add_argument("--network", default="hieradet_d_tiny")
    parser.add_argument("--full-depth", action="store_true", help="the network's real depths and width, not 1/16")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--levels", default="1,8,32", help="client counts of the scaling table")
    parser.add_argument("--scaling-requests", type=int, default=160, help="requests per cell of the scaling table")
    parser.add_argument("--extra-rounds", type=int, default=2, help="further load rounds to watch memory settle")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, help="bound the load run's queue: 503s are counted as shed")
    parser.add_argument("--options-requests", type=int, default=300, help="requests per run of the options ratio")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.serve_support import chelsea_jpeg

    good = chelsea_jpeg()
    bad = good[: len(good) // 2]
    with tempfile.TemporaryDirectory() as tmp:
        tiny = args.network.startswith("hieradet_d_tiny") and not args.full_depth
        model = args.model or str(make_checkpoint(Path(tmp), args.network, args.size, args.classes, tiny))
        print(
            f"model {args.model or f'{args.network} (random, {args.size}px, {args.classes} classes)'} "
            f"on {args.device}; {os.cpu_count()} CPUs"
        )

        queue = ["--max-queue", str(args.max_queue)] if args.max_queue else []
        server = Server(model, args.max_batch, args.device, args.max_wait_ms, queue)
        try:
            asyncio.run(drive(server.url, good, bad, 40, 8))
            before = server.rss()
            load = asyncio.run(drive(server.url, good, bad, args.requests, args.concurrency))
            after = server.rss()
            rounds = [after]
            for _ in range(args.extra_rounds):
                extra = asyncio.run(drive(server.url, good, bad, args.requests, args.concurrency))
                load["errors"] += extra["errors"]
                load["shed"] += extra["shed"]
                rounds.append(server.rss())
            health = httpx.get(f"{server.url}/healthz").json()
        finally:
            server.stop()
        print(
            f"\nload: {args.concurrency} clients, {load['requests']} requests (10% truncated JPEGs -> 422), "
            f"max-batch {args.max_batch}"
        )
        print(f"  unexpected answers: {len(load['errors'])}")
        if args.max_queue:
            print(
                f"  --max-queue {args.max_queue}: {load['shed']} answers shed (503 + Retry-After) over all rounds; "
                f"first round's shed answers p50 {load['shed_p50']:.1f} ms, p95 {load['shed_p95']:.1f} ms"
            )
        for err in load["errors"][:5]:
            print(f"    {err}")
        print(
            f"  latency p50 {load['p50']:.1f} ms, p95 {load['p95']:.1f} ms; throughput {load['throughput']:.1f} req/s"
        )
        stages = ", ".join(f"{k} {v:.1f}" for k, v in load["stage_p50"].items())
        print(
            f"  inside the server (Server-Timing): p50 {load['server_p50']:.1f} ms, p95 {load['server_p95']:.1f} ms; "
            f"stage p50s: {stages} ms"
        )
        print(
            f"  server RSS before {before:.1f} MiB, after {after:.1f} MiB ({after - before:+.1f} MiB); "
            f"mean batch {health['mean_batch']:.2f} over {health['batches']} batches"
        )
        if args.extra_rounds:
            print(
                f"  RSS after each further round of {args.requests}: "
                + ", ".join(f"{r:.1f}" for r in rounds[1:])
                + " MiB (flat = no leak)"
            )

        levels = [int(v) for v in args.levels.split(",")]
        table: dict[tuple[int, int], dict] = {}
        for max_batch in sorted({1, args.max_batch}):
            server = Server(model, max_batch, args.device, args.max_wait_ms)
            try:
                asyncio.run(drive(server.url, good, None, 20, 4))
                for level in levels:
                    table[max_batch, level] = asyncio.run(drive(server.url, good, None, args.scaling_requests, level))
            finally:
                server.stop()
        baseline = table[1, 1]["throughput"]
        print(f"\nthroughput, req/s (ratio to one request at a time: 1 client, max-batch 1 = {baseline:.1f} req/s)")
        print(f"  {'clients':>8} " + " ".join(f"{f'max-batch {b}':>22}" for b in sorted({1, args.max_batch})))
        for level in levels:
            cells = [table[b, level] for b in sorted({1, args.max_batch})]
            print(
                f"  {level:>8} "
                + " ".join(
                    f"{c['throughput']:>9.1f} ({c['throughput'] / baseline:4.2f}x) p95 {c['p95']:5.0f}" for c in cells
                )
            )
        overhead = options_ratio(model, args, good)
        failures = len(load["errors"]) + sum(len(c["errors"]) for c in table.values()) + overhead
    return 1 if failures else 0


def options_ratio(model: str, args: argparse.Namespace, good: bytes) -> int:
    """Throughput at 8 clients with keys, an unreached rate limit and JSON logs, against none of them; errors."""
    key = "benchmark-key-0123456789abcdef"
    errors = 0
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.txt"
        keys.write_text(key + "\n")
        runs = {}
        for label, extra, headers in (
            ("plain", [], None),
            (
                "keys+limit+json",
                ["--api-keys", str(keys), "--rate-limit", "1000000/min", "--log-json"],
                {"X-API-Key": key},
            ),
        ):
            server = Server(model, args.max_batch, args.device, args.max_wait_ms, extra)
            try:
                asyncio.run(drive(server.url, good, None, 40, 8, headers))
                runs[label] = asyncio.run(drive(server.url, good, None, args.options_requests, 8, headers))
            finally:
                server.stop()
            errors += len(runs[label]["errors"])
    plain, guarded = runs["plain"]["throughput"], runs["keys+limit+json"]["throughput"]
    print(
        f"\nopen-network options at 8 clients: {guarded:.1f} req/s with keys, rate limit and JSON logs against "
        f"{plain:.1f} req/s without ({guarded / plain:.2f}x)"
    )
    return errors


if __name__ == "__main__":
    sys.exit(main())
