"""Query photos against an index: each query is embedded exactly as the index was (same model, size and tta,
through `hierax.inference.predict.embed`), then its k most similar indexed photos are listed."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hierax.errors import HieraxError
from hierax.inference import formats
from hierax.inference.loading import ModelSpec, resolve_model
from hierax.inference.predict import RunSummary, embed
from hierax.similar.identity import IN_MEMORY, ModelIdentity
from hierax.similar.index import SimilarIndex, open_index

SEARCH_COLUMNS = ["query", "rank", "path", "similarity"]


def load_matching_model(
    record: ModelIdentity,
    what: str,
    model: ModelSpec | None = None,
    *,
    size: tuple[int, int] | int | None = None,
    tta: bool | None = None,
    device=None,
    backend: str = "torch",
):
    """(net, info, identity) of `model` (default: the one `record` names) at the record's size and tta, after
    checking that it makes the embeddings `what` (an index, a few-shot file) was made from."""
    if model is None:
        if record.model == IN_MEMORY:
            raise HieraxError(f"{what} was made by a model held in memory: give the model (--model)")
        model = record.model
    net, info = resolve_model(model, device=device, size=size or record.size, backend=backend)
    identity = ModelIdentity.of(model, net, info, tta=record.tta if tta is None else tta)
    record.check(identity, what)
    return net, info, identity


def embed_images(
    sources,
    net,
    info,
    *,
    tta: bool = False,
    batch_size: int = 16,
    workers: int | None = None,
    amp: bool = False,
    progress: bool = False,
) -> tuple[list[str], np.ndarray, RunSummary]:
    """(paths, (N, D) float32 embeddings, run summary) of the images that decoded; failures are in
    summary.errors. Goes through embed, in memory."""
    run = embed(sources, (net, info), tta=tta, batch_size=batch_size, workers=workers, amp=amp, progress=progress)
    paths = [row["path"] for row in run.rows]
    dim = getattr(net, "embedding_size", 0)
    vectors = np.stack([row["embedding"] for row in run.rows]).astype(np.float32) if run.rows else np.zeros((0, dim))
    return paths, vectors, run


@dataclass
class SearchResult:
    """Rows (query, rank, path, similarity), the queries that failed (path, reason), and the output file."""

    rows: list[dict]
    errors: list[tuple[str, str]] = field(default_factory=list)
    output: Path | None = None
    queries: int = 0


def match_rows(queries: Sequence[str], index: SimilarIndex, embeddings: np.ndarray, k: int) -> list[dict]:
    """Search rows for query embeddings: query, rank (1 = most similar), path, similarity."""
    rows = []
    for query, matches in zip(queries, index.search(embeddings, k) if len(queries) else [], strict=True):
        for rank, match in enumerate(matches, start=1):
            rows.append({"query": query, "rank": rank, "path": match.path, "similarity": round(match.similarity, 6)})
    return rows


def search_images(
    sources,
    index: SimilarIndex | str | os.PathLike,
    model: ModelSpec | None = None,
    *,
    k: int = 10,
    output: str | os.PathLike | None = None,
    size: tuple[int, int] | int | None = None,
    tta: bool | None = None,
    batch_size: int = 16,
    workers: int | None = None,
    device=None,
    amp: bool = False,
    progress: bool = False,
    backend: str = "torch",
) -> SearchResult:
    """The k indexed photos most like each query image. `model` defaults to the one the index records; size
    and tta to the index's (others are refused). Rows go to `output` (.csv, .jsonl, .parquet) when given."""
    if k < 1:
        raise HieraxError(f"k must be at least 1, not {k}")
    if output is not None:
        formats.check_format(output, formats.ROW_FORMATS)
    index = index if isinstance(index, SimilarIndex) else open_index(index)
    what = f"the index {index.directory}"
    net, info, identity = load_matching_model(
        index.model, what, model, size=size, tta=tta, device=device, backend=backend
    )
    paths, vectors, run = embed_images(
        sources, net, info, tta=identity.tta, batch_size=batch_size, workers=workers, amp=amp, progress=progress
    )
    rows = match_rows(paths, index, vectors, k)
    result = SearchResult(rows, list(run.errors), queries=run.total)
    if output is not None:
        formats.write_all(output, rows, SEARCH_COLUMNS)
        result.output = Path(output)
    return result
