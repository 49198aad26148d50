"""The similar-photo index at scale: build time, memory, query latency and recall@10 of hierax's HNSW index
(`hierax.similar.vectors.VectorIndex` past its exact limit) against exact search (the same class below it: faiss
`IndexFlatIP`) on random unit vectors, in one process. Optionally the same on usearch and hnswlib, the
alternatives considered (install them by hand, outside hierax's dependencies).

Random 768-d vectors are the hard case for a graph index (no low-dimensional structure, every neighbour nearly
as far as any other), so recall here is a floor; "near" queries (a stored vector plus small noise, like a
re-encoded or cropped copy) show the near-duplicate case, where what counts is that the query's source comes
first (the other nine of its exact top-10 are as far as random vectors).

    python benchmarks/similar.py --n 1000000            # 3 GB of vectors, 3.3 GB of index
    python benchmarks/similar.py --n 100000 --threads 1 --compare usearch hnswlib
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    """n random unit vectors, made in chunks so that only the result is held."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for start in range(0, n, 65536):
        block = rng.standard_normal((min(65536, n - start), d), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def timed_queries(search, queries: np.ndarray, singles: int) -> tuple[float, float, np.ndarray]:
    """(ms per query one at a time, ms per query in one batch, ids of the batch)."""
    search(queries[:2])
    start = time.perf_counter()
    for i in range(singles):
        search(queries[i : i + 1])
    single = (time.perf_counter() - start) / singles * 1e3
    start = time.perf_counter()
    ids = search(queries)
    return single, (time.perf_counter() - start) / len(queries) * 1e3, ids


def contenders(names: list[str], args):
    """(name, build(base) -> search(queries) -> ids, save(path)) for hierax and the requested alternatives."""
    from hierax.similar.vectors import HNSW_EF_CONSTRUCTION, HNSW_NEIGHBOURS, VectorIndex

    def hierax_hnsw(base):
        index = VectorIndex(base.shape[1], exact_max=0, ef_search=args.ef)
        index.add(base)
        return (lambda q: index.search(q, args.k)[1]), index.save

    def exact(base):
        index = VectorIndex(base.shape[1], exact_max=len(base))
        index.add(base)
        return (lambda q: index.search(q, args.k)[1]), index.save

    def usearch_hnsw(base):
        from usearch.index import Index

        index = Index(ndim=base.shape[1], metric="ip", dtype="f16", connectivity=HNSW_NEIGHBOURS)
        index.expansion_add, index.expansion_search = HNSW_EF_CONSTRUCTION, args.ef
        index.add(np.arange(len(base)), base, threads=args.threads)
        return (lambda q: index.search(q, args.k, threads=args.threads).keys), lambda p: index.save(str(p))

    def hnswlib_hnsw(base):
        import hnswlib

        index = hnswlib.Index(space="ip", dim=base.shape[1])
        index.init_index(max_elements=len(base), ef_construction=HNSW_EF_CONSTRUCTION, M=HNSW_NEIGHBOURS)
        index.set_num_threads(args.threads)
        index.add_items(base, np.arange(len(base)))
        index.set_ef(args.ef)
        return (lambda q: index.knn_query(q, args.k)[0]), lambda p: index.save_index(str(p))

    table = {"exact": exact, "hierax": hierax_hnsw, "usearch": usearch_hnsw, "hnswlib": hnswlib_hnsw}
    return [(name, table[name]) for name in ["exact", "hierax", *names]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="stored vectors (1,000,000)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--singles", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--ef", type=int, default=128, help="HNSW search depth")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--compare", nargs="*", default=[], choices=["usearch", "hnswlib"])
    args = parser.parse_args(argv)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    base = unit_vectors(args.n, args.dim, 0)
    far = unit_vectors(args.queries, args.dim, 1)
    rng = np.random.default_rng(2)
    sources = rng.choice(args.n, args.queries, replace=False)
    near = base[sources] + 0.05 * unit_vectors(args.queries, args.dim, 3)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    print(
        f"{args.n} x {args.dim} random unit vectors, {args.queries} queries, k={args.k}, ef={args.ef}, "
        f"{args.threads} threads, faiss {faiss.__version__}"
    )
    truth: dict[str, np.ndarray] = {}
    baseline: dict[str, float] = {}
    for name, build in contenders(args.compare, args):
        before = rss_mib()
        start = time.perf_counter()
        search, save = build(base)
        built = time.perf_counter() - start
        grown = rss_mib() - before
        with tempfile.TemporaryDirectory() as tmp:
            save(os.path.join(tmp, "index"))
            size = os.path.getsize(os.path.join(tmp, "index")) / 2**20
        line = [f"{name:8s} build {built:7.1f} s, +{grown:6.0f} MiB resident, file {size:6.0f} MiB"]
        for label, queries in (("random", far), ("near", near)):
            single, batch, ids = timed_queries(search, queries, min(args.singles, len(queries)))
            truth.setdefault(label, ids)  # exact runs first
            if name == "exact":
                baseline[label] = single
            ratio = baseline[label] / single
            found = f", its source first {np.mean(ids[:, 0] == sources):.3f}" if label == "near" else ""
            line.append(
                f"{label}: {single:7.2f} ms/query alone ({ratio:5.1f}x exact), {batch:6.3f} ms/query in a batch, "
                f"recall@{args.k} {recall_at(ids, truth[label]):.3f}{found}"
            )
        print(" | ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
