"""hierax.similar.vectors: exact search equals brute force, the move to HNSW keeps every id, pairs above a
threshold, files."""

from __future__ import annotations

import numpy as np
import pytest

from hierax.errors import HieraxError
from hierax.similar.vectors import VectorIndex, normalise


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Vectors near 40 centres in a 16-d subspace, like embeddings (low intrinsic dimension)."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((16, d))
    centres = rng.standard_normal((40, 16))
    latent = centres[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, 16))
    return (latent @ basis + 0.05 * rng.standard_normal((n, d))).astype(np.float32)


def brute_force(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = normalise(queries) @ normalise(base).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def test_exact_search_is_brute_force_cosine():
    base = unit_rows(500, 24, 0) * np.random.default_rng(1).uniform(0.1, 50, (500, 1)).astype(np.float32)
    queries = unit_rows(20, 24, 2) * 7.0
    index = VectorIndex(24)
    index.add(base[:300])
    index.add(base[300:])
    sims, ids = index.search(queries, 10)
    want_sims, want_ids = brute_force(base, queries, 10)
    assert index.kind == "exact" and len(index) == 500
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 1e-6), "best first"


def test_fewer_vectors_than_k_pad_with_minus_one():
    index = VectorIndex(8)
    index.add(unit_rows(3, 8, 0))
    sims, ids = index.search(unit_rows(2, 8, 1), 5)
    assert (ids[:, 3:] == -1).all() and np.isneginf(sims[:, 3:]).all()
    assert sorted(ids[0, :3]) == [0, 1, 2]
    empty_sims, empty_ids = VectorIndex(8).search(unit_rows(1, 8, 1), 2)
    assert (empty_ids == -1).all() and np.isneginf(empty_sims).all()


def test_wrong_dimension_and_bad_k_are_refused():
    index = VectorIndex(8)
    with pytest.raises(HieraxError, match="9 dimensions; this index holds 8"):
        index.add(unit_rows(2, 9, 0))
    with pytest.raises(HieraxError, match="k must be at least 1"):
        index.search(unit_rows(1, 8, 0), 0)


def test_crossing_the_exact_limit_builds_a_graph_that_keeps_ids_and_finds_neighbours(tmp_path):
    data = clustered(3000, 64, 0)
    queries = clustered(200, 64, 1)
    index = VectorIndex(64, exact_max=1000)
    index.add(data[:800])
    assert index.kind == "exact"
    index.add(data[800:])
    assert index.kind == "hnsw" and len(index) == 3000
    np.testing.assert_allclose(index.vectors(790, 810), normalise(data[790:810]), atol=1e-6)
    _, ids = index.search(queries, 10)
    _, want = brute_force(data, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, want)])
    assert recall >= 0.95, recall
    index.save(tmp_path / "v.faiss")
    again = VectorIndex.load(tmp_path / "v.faiss")
    assert again.kind == "hnsw" and len(again) == 3000
    np.testing.assert_array_equal(again.search(queries, 10)[1], ids)


def test_pairs_above_a_threshold_are_all_pairs_once():
    data = unit_rows(400, 16, 0)
    data[200:210] = data[:10] + 0.02 * unit_rows(10, 16, 1)
    data[300] = data[0]
    index = VectorIndex(16)
    index.add(data)
    i, j, sims = index.pairs_above(0.95)
    full = normalise(data) @ normalise(data).T
    want = {(a, b) for a, b in zip(*np.nonzero(np.triu(full >= 0.95, k=1)))}
    assert set(zip(i.tolist(), j.tolist())) == want and len(i) == len(want)
    assert (0, 300) in want and (0, 200) in want and (200, 300) in want
    np.testing.assert_allclose(sims, full[i, j], atol=1e-5)


def test_a_damaged_file_is_a_clear_error(tmp_path):
    path = tmp_path / "v.faiss"
    path.write_bytes(b"not an index at all")
    with pytest.raises(HieraxError, match="cannot read the vector index"):
        VectorIndex.load(path)
