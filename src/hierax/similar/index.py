"""A similar-photo index on disk: embeddings from `hierax.inference.predict.embed` plus a faiss vector index.

INDEX_DIR/
    index.json                 format, the model that made it (ModelIdentity), count, vector index kind
    embeddings.parquet         path, embedding: written by embed (chunked; resumable from embeddings.parquet.parts/)
    embeddings.errors.csv      path, reason of the images that failed in the last run
    vectors.faiss              cosine index over the rows of embeddings.parquet, in order (see similar.vectors)
    duplicates.csv             path_a, path_b, similarity, when asked for (build_index(duplicates=...))

Building into an existing index adds the photos it does not hold yet (same model only). A run that dies (Ctrl-C,
SIGKILL, power) leaves index.json marked incomplete and its finished embedding chunks in the parts folder;
`resume=True` continues it and loses nothing, and without it the next run refuses to start rather than guess.
The vector index is only ever rebuilt from embeddings.parquet, so a crash while it is written costs a rebuild.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
import pyarrow.parquet as pq

from hierax.atomic import atomic_write
from hierax.distributed import is_main_rank
from hierax.errors import HieraxError
from hierax.inference.loading import ModelSpec, resolve_model
from hierax.inference.predict import RunSummary, embed
from hierax.inference.writers import parts_dir
from hierax.similar.identity import ModelIdentity
from hierax.similar.vectors import EXACT_MAX, HNSW_EF_SEARCH, VectorIndex
from hierax.weights.catalog import DEFAULT_MODEL

logger = logging.getLogger(__name__)

FORMAT = "hierax-similar-index-1"
MANIFEST = "index.json"
EMBEDDINGS = "embeddings.parquet"
ERRORS = "embeddings.errors.csv"
VECTORS = "vectors.faiss"
DUPLICATES = "duplicates.csv"


class Match(NamedTuple):
    """One search hit: an indexed photo and its cosine similarity to the query."""

    path: str
    similarity: float


def _paths_digest(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The index.json of an index folder, or None when the folder holds no index."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise HieraxError(f"{path} cannot be read ({err}); the index is damaged: rebuild it") from None
    if manifest.get("format") != FORMAT:
        raise HieraxError(f"{path} is not a hierax similar-photo index (format {manifest.get('format')!r})")
    return manifest


def _write_manifest(directory: Path, identity: ModelIdentity, *, complete: bool, count: int, digest: str, kind: str):
    manifest = {
        "format": FORMAT,
        "model": identity.to_dict(),
        "complete": complete,
        "count": count,
        "paths_digest": digest,
        "vectors": {"library": "faiss", "version": faiss.__version__, "kind": kind, "metric": "cosine"},
        "updated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(directory / MANIFEST, lambda tmp: Path(tmp).write_text(text, "utf-8"))


def read_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray | None]:
    """(paths, (N, D) float32 embeddings) of an embed .parquet output; a path written twice (a run killed while
    merging its parts) keeps its first row. Embeddings are None when the file has no rows."""
    table = pq.read_table(path, columns=["path", "embedding"])
    paths = table.column("path").to_pylist()
    if not paths:
        return [], None
    column = table.column("embedding").combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    vectors = np.asarray(flat, dtype=np.float32).reshape(len(paths), column.type.list_size)
    _, first = np.unique(np.asarray(paths, dtype=object), return_index=True)
    if len(first) < len(paths):
        keep = np.sort(first)
        logger.warning("%s: %d paths written twice; keeping their first rows", path, len(paths) - len(keep))
        paths, vectors = [paths[i] for i in keep], vectors[keep]
    return paths, vectors


class SimilarIndex:
    """An opened index: `search(embeddings, k)` -> photos most like each embedding (cosine), best first."""

    def __init__(self, directory: Path, model: ModelIdentity, paths: list[str], vectors: VectorIndex) -> None:
        if len(paths) != len(vectors):
            raise HieraxError(f"{directory}: {len(paths)} paths but {len(vectors)} vectors; rebuild the index")
        self.directory = directory
        self.model = model
        self.paths = paths
        self.vectors = vectors

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def kind(self) -> str:
        """'exact' or 'hnsw' (see hierax.similar.vectors)."""
        return self.vectors.kind

    def check_model(self, other: ModelIdentity) -> None:
        """ModelMismatchError unless `other` makes the embeddings this index holds."""
        self.model.check(other, f"the index {self.directory}")

    def search(self, embeddings: np.ndarray, k: int = 10) -> list[list[Match]]:
        """For each (D,) row of `embeddings` (any scale; normalised here), its k most similar indexed photos."""
        sims, ids = self.vectors.search(np.atleast_2d(embeddings), min(k, max(len(self), 1)))
        return [
            [Match(self.paths[i], float(s)) for s, i in zip(row_s, row_i) if i >= 0] for row_s, row_i in zip(sims, ids)
        ]

    def duplicates(self, threshold: float) -> list[tuple[str, str, float]]:
        """Pairs of indexed photos whose cosine similarity is at least `threshold`, most similar first.
        Exact below EXACT_MAX photos; on an HNSW index a pair the graph search misses is missed."""
        if not -1.0 <= threshold <= 1.0:
            raise HieraxError(f"a cosine threshold lies in [-1, 1], not {threshold}")
        i, j, sims = self.vectors.pairs_above(threshold)
        order = np.lexsort((j, i, -sims))
        return [(self.paths[i[o]], self.paths[j[o]], float(sims[o])) for o in order]


def open_index(directory: str | os.PathLike, *, ef_search: int = HNSW_EF_SEARCH) -> SimilarIndex:
    """Open an index folder written by build_index (HieraxError when it is missing, unfinished or damaged)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise HieraxError(f"no similar-photo index at {directory}: build one with `hierax index PHOTOS --output DIR`")
    if not manifest.get("complete"):
        raise HieraxError(f"the index {directory} is unfinished (its build was interrupted): rerun it with --resume")
    model = ModelIdentity.from_dict(manifest["model"])
    paths, _ = read_embeddings(directory / EMBEDDINGS) if (directory / EMBEDDINGS).exists() else ([], None)
    vectors = VectorIndex.load(directory / VECTORS, ef_search=ef_search)
    if len(vectors) != int(manifest.get("count", -1)) or _paths_digest(paths) != manifest.get("paths_digest"):
        raise HieraxError(f"the index {directory} does not match its embeddings; rerun `hierax index` to repair it")
    return SimilarIndex(directory, model, paths, vectors)


@dataclass
class IndexSummary:
    """What build_index did: the embed run, the photos added, the opened index and the duplicates file."""

    run: RunSummary
    added: int
    index: SimilarIndex | None
    duplicates: Path | None = None

    def line(self) -> str:
        if self.index is None:
            return self.run.line()
        text = f"{self.run.line()}; {len(self.index)} photos in the index ({self.added} new, {self.index.kind})"
        return text + (f"; duplicates in {self.duplicates}" if self.duplicates else "")


def _prepare(directory: Path, identity: ModelIdentity, resume: bool) -> dict | None:
    """Check an existing index folder against this run (model, unfinished state); None for a new one."""
    manifest = read_manifest(directory)
    if manifest is None:
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise HieraxError(f"{directory} exists and is not a similar-photo index: choose an empty or new folder")
        return None
    ModelIdentity.from_dict(manifest["model"]).check(identity, f"the index {directory}")
    unfinished = not manifest.get("complete") or parts_dir(directory / EMBEDDINGS).exists()
    if unfinished and not resume:
        raise HieraxError(
            f"the index {directory} has an unfinished run (interrupted): rerun with --resume to continue it"
        )
    return manifest


def _update_vectors(directory: Path, manifest: dict | None, paths: list[str], vectors, identity, exact_max: int):
    """Add the rows not yet in vectors.faiss; rebuild it when it does not match the first rows it should hold."""
    vector_path = directory / VECTORS
    index = None
    if manifest is not None and vector_path.exists():
        count = int(manifest.get("count", -1))
        try:
            index = VectorIndex.load(vector_path, exact_max=exact_max)
        except HieraxError as err:
            logger.warning("%s; rebuilding it", err)
        if index is not None and not (
            len(index) == count <= len(paths) and _paths_digest(paths[:count]) == manifest.get("paths_digest")
        ):
            logger.warning("%s does not match the embeddings; rebuilding it", vector_path)
            index = None
    if index is None:
        index = VectorIndex(identity.embedding_dim, exact_max=exact_max)
    if vectors is not None and len(vectors) > len(index):
        if vectors.shape[1] != identity.embedding_dim:
            raise HieraxError(
                f"{directory}: embeddings are {vectors.shape[1]}-d, the model's are {identity.embedding_dim}"
            )
        index.add(vectors[len(index) :])
    index.save(vector_path)
    return index


def write_duplicates(path: str | os.PathLike, pairs: Sequence[tuple[str, str, float]]) -> Path:
    """A path_a,path_b,similarity CSV (atomic)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["path_a", "path_b", "similarity"])
            out.writerows((a, b, f"{s:.6f}") for a, b, s in pairs)

    return atomic_write(path, write)


def build_index(
    sources,
    model: ModelSpec = DEFAULT_MODEL,
    *,
    output: str | os.PathLike,
    resume: bool = False,
    duplicates: float | None = None,
    exact_max: int = EXACT_MAX,
    batch_size: int = 16,
    workers: int | None = None,
    device=None,
    amp: bool = False,
    tta: bool = False,
    size: tuple[int, int] | int | None = None,
    chunk_size: int = 256,
    progress: bool = True,
    backend: str = "torch",
) -> IndexSummary:
    """Embed the photos named by `sources` into the index folder `output` (new, or an existing one made by the
    same model: photos it holds are skipped) and bring its vector index up to date. `duplicates`: also write
    `output/duplicates.csv` with every pair of photos at least this similar (cosine)."""
    if duplicates is not None and not -1.0 <= duplicates <= 1.0:
        raise HieraxError(f"--duplicates takes a cosine similarity in [-1, 1], not {duplicates}")
    directory = Path(output)
    net, info = resolve_model(model, device=device, size=size, backend=backend)
    identity = ModelIdentity.of(model, net, info, tta=tta)
    manifest = _prepare(directory, identity, resume)
    main = is_main_rank()
    if main:
        count = int(manifest["count"]) if manifest else 0
        digest = manifest["paths_digest"] if manifest else _paths_digest([])
        kind = manifest["vectors"]["kind"] if manifest else "exact"
        _write_manifest(directory, identity, complete=False, count=count, digest=digest, kind=kind)
    run = embed(
        sources,
        (net, info),
        output=directory / EMBEDDINGS,
        errors_output=directory / ERRORS,
        resume=True,  # an existing index is added to; an interrupted run goes on from its parts
        batch_size=batch_size,
        workers=workers,
        amp=amp,
        tta=tta,
        chunk_size=chunk_size,
        progress=progress,
    )
    if not main:
        return IndexSummary(run, 0, None)
    paths, vectors = read_embeddings(directory / EMBEDDINGS)
    before = int(manifest["count"]) if manifest else 0
    index = _update_vectors(directory, manifest, paths, vectors, identity, exact_max)
    _write_manifest(directory, identity, complete=True, count=len(index), digest=_paths_digest(paths), kind=index.kind)
    opened = SimilarIndex(directory, identity, paths, index)
    summary = IndexSummary(run, len(paths) - before, opened)
    if duplicates is not None:
        summary.duplicates = write_duplicates(directory / DUPLICATES, opened.duplicates(duplicates))
    return summary
