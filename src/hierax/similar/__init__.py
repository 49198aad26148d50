"""Similar photos, species of the user's own and "none of these", all from the model's embeddings.

    build_index(PATHS, model, output=DIR)            embed (chunked, resumable) + faiss index; adds to an existing one
    open_index(DIR) -> SimilarIndex                  .search(embeddings, k) -> [[Match(path, similarity)]]
    search_images(PATHS, index, model=None, k=10)    queries embedded as the index was, then searched
    fit_fewshot(REFS, model, output=FILE)            prototype classifier with calibrated probabilities
    ExtraSpecies.load(FILE)                          .probabilities(embeddings) -> (N, E)
    combine_scores(model_probs, embeddings, extra)   one ranked list of the model's classes and the user's
    decide(probs, names, threshold)                  best name or "unknown"; open_set_rollup for the roll-up
    OpenSet.load(FILE, only_extra=False, threshold=None)   those rules as `predict(..., open_set=...)` takes them

Queries, references and indexed photos go through the same `hierax.inference.predict.embed`; every file records
the model that made it (ModelIdentity) and refuses embeddings of another.
"""

from hierax.similar.fewshot import ExtraSpecies, fit_fewshot, fit_prototypes
from hierax.similar.identity import ModelIdentity, ModelMismatchError
from hierax.similar.index import IndexSummary, Match, SimilarIndex, build_index, open_index
from hierax.similar.openset import (
    UNKNOWN,
    OpenSet,
    RankedScores,
    combine_scores,
    decide,
    open_set_rollup,
    unknown_mask,
)
from hierax.similar.search import SearchResult, embed_images, load_matching_model, search_images

__all__ = [
    "UNKNOWN",
    "ExtraSpecies",
    "IndexSummary",
    "Match",
    "ModelIdentity",
    "ModelMismatchError",
    "OpenSet",
    "RankedScores",
    "SearchResult",
    "SimilarIndex",
    "build_index",
    "combine_scores",
    "decide",
    "embed_images",
    "fit_fewshot",
    "fit_prototypes",
    "load_matching_model",
    "open_index",
    "open_set_rollup",
    "search_images",
    "unknown_mask",
]
