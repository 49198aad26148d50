"""Cosine nearest neighbours over L2-normalised float32 vectors, with faiss.

Up to `EXACT_MAX` vectors the index is exact (faiss `IndexFlatIP`: one BLAS matrix product per query batch);
past it the vectors move into an HNSW graph (`IndexHNSWFlat`, inner product) whose queries cost about log N
instead of N. Vectors are normalised on the way in, so the inner product is the cosine similarity. Ids are
positions in insertion order; adding never renumbers. The choice of faiss, the threshold and the HNSW settings
are measured in benchmarks/similar.py (figures in benchmarks/README.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import faiss
import numpy as np

from hierax.atomic import atomic_write
from hierax.errors import HieraxError

logger = logging.getLogger(__name__)

EXACT_MAX = 100_000
"""Largest number of vectors searched exactly; one query then reads at most 100k x 768 x 4 B = 300 MB."""
HNSW_NEIGHBOURS = 32
"""Graph links per vector (HNSW's M): 2 x 32 x 4 B = 256 B per vector on top of the vector itself."""
HNSW_EF_CONSTRUCTION = 100
HNSW_EF_SEARCH = 128
_ADD_CHUNK = 65_536


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as C-contiguous float32 (2-D); an all-zero row stays zero."""
    x = np.ascontiguousarray(np.atleast_2d(np.asarray(vectors, dtype=np.float32)))
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


class VectorIndex:
    """Cosine k-NN over vectors of one dimension: exact up to `exact_max` vectors, an HNSW graph above."""

    def __init__(self, dim: int, *, exact_max: int = EXACT_MAX, ef_search: int = HNSW_EF_SEARCH) -> None:
        if dim < 1:
            raise HieraxError(f"vectors need at least one dimension, not {dim}")
        self.dim = int(dim)
        self.exact_max = int(exact_max)
        self.ef_search = int(ef_search)
        self._index: faiss.Index = faiss.IndexFlatIP(self.dim)

    @property
    def kind(self) -> str:
        """'exact' or 'hnsw'."""
        return "hnsw" if isinstance(self._index, faiss.IndexHNSW) else "exact"

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def _check(self, vectors: np.ndarray) -> np.ndarray:
        x = normalise(vectors)
        if x.shape[1] != self.dim:
            raise HieraxError(f"vectors have {x.shape[1]} dimensions; this index holds {self.dim}")
        return x

    def add(self, vectors: np.ndarray) -> None:
        """Append vectors (normalised here); their ids continue from len(self). Crossing `exact_max` moves
        everything into an HNSW graph once."""
        x = self._check(vectors)
        if self.kind == "exact" and len(self) + len(x) > self.exact_max:
            old = self._index.reconstruct_n(0, len(self)) if len(self) else np.zeros((0, self.dim), np.float32)
            total = len(old) + len(x)
            logger.info("%d vectors: building an HNSW graph (exact search is kept up to %d)", total, self.exact_max)
            self._index = self._new_hnsw()
            self._add_chunked(old)
        self._add_chunked(x)

    def _new_hnsw(self) -> faiss.Index:
        index = faiss.IndexHNSWFlat(self.dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index

    def _add_chunked(self, x: np.ndarray) -> None:
        for start in range(0, len(x), _ADD_CHUNK):
            self._index.add(x[start : start + _ADD_CHUNK])

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (Q, k), best first; id -1 (similarity -inf) where the index has fewer
        than k vectors. Queries are normalised here."""
        if k < 1:
            raise HieraxError(f"k must be at least 1, not {k}")
        q = self._check(queries)
        if len(self) == 0 or len(q) == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        if self.kind == "hnsw":
            self._index.hnsw.efSearch = max(self.ef_search, k)
        sims, ids = self._index.search(q, k)
        sims[ids < 0] = -np.inf
        return sims, ids

    def pairs_above(self, threshold: float, batch: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pair (i < j) of stored vectors with cosine similarity >= threshold: (i, j, similarity) arrays.
        A range search in batches of `batch` queries: exact on an exact index; on HNSW a graph search, which
        may miss a pair."""
        found_i, found_j, found_s = [], [], []
        for start in range(0, len(self), batch):
            q = self.vectors(start, start + batch)
            if self.kind == "hnsw":
                self._index.hnsw.efSearch = self.ef_search
            lims, sims, ids = self._index.range_search(q, float(np.nextafter(np.float32(threshold), -np.inf)))
            rows = np.repeat(np.arange(start, start + len(q)), np.diff(lims.astype(np.int64)))
            keep = (ids != rows) & (ids >= 0) & (sims >= threshold)
            found_i.append(np.minimum(rows[keep], ids[keep]))
            found_j.append(np.maximum(rows[keep], ids[keep]))
            found_s.append(sims[keep])
        if not found_i:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        # Each pair turns up from both ends (on a graph, maybe from one only): keep it once.
        pairs, first = np.unique(
            np.stack([np.concatenate(found_i), np.concatenate(found_j)]), axis=1, return_index=True
        )
        return pairs[0].astype(np.int64), pairs[1].astype(np.int64), np.concatenate(found_s)[first]

    def vectors(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The stored (normalised) vectors start..stop, as (n, dim) float32."""
        stop = len(self) if stop is None else min(stop, len(self))
        if stop <= start:
            return np.zeros((0, self.dim), np.float32)
        return self._index.reconstruct_n(start, stop - start)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """The stored (normalised) vectors with these ids, as (n, dim) float32."""
        ids = np.asarray(ids, dtype=np.int64)
        return self._index.reconstruct_batch(ids) if len(ids) else np.zeros((0, self.dim), np.float32)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index atomically (faiss's own format)."""
        return atomic_write(path, lambda tmp: faiss.write_index(self._index, tmp))

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, exact_max: int = EXACT_MAX, ef_search: int = HNSW_EF_SEARCH
    ) -> VectorIndex:
        """Read an index written by save()."""
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as err:
            first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise HieraxError(f"cannot read the vector index {path} ({first}); rebuild it") from None
        if not isinstance(index, faiss.IndexFlatIP | faiss.IndexHNSWFlat):
            raise HieraxError(f"{path} holds a {type(index).__name__}, not a hierax vector index; rebuild it")
        out = cls(index.d, exact_max=exact_max, ef_search=ef_search)
        out._index = index
        return out
