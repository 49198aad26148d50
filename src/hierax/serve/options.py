"""The service's optional parts, all off by default: `ServiceOptions` (running on an open network: keys, CORS,
rate limits, a bounded queue, time-outs, JSON access logs) and `Addons` (a location prior, a similar-photo
index, the user's own species, an unknown threshold)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from hierax.errors import HieraxError
from hierax.geo import GeoPrior, load_prior
from hierax.serve.access import KeyRing
from hierax.serve.limits import RateLimit
from hierax.similar import ExtraSpecies, SimilarIndex, open_index


@dataclass(frozen=True)
class ServiceOptions:
    """How the service faces its clients.

    api_keys: required keys (None: open to everyone); cors_origins: browser origins allowed to call the API;
    rate_limit: per key or client address; max_queue: most model requests inside at once, the next gets 503;
    request_timeout: seconds a model request may take (upload included); log_json: JSON access-log lines."""

    api_keys: KeyRing | None = None
    cors_origins: Sequence[str] = ()
    rate_limit: RateLimit | None = None
    max_queue: int | None = None
    request_timeout: float | None = None
    log_json: bool = False

    def __post_init__(self) -> None:
        if self.max_queue is not None and self.max_queue < 1:
            raise HieraxError(f"--max-queue must be at least 1, got {self.max_queue}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise HieraxError(f"--request-timeout must be a positive number of seconds, got {self.request_timeout}")
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise HieraxError(f"--cors-origin '{origin}' is not an origin: write it as https://host[:port]")


@dataclass
class Addons:
    """What the service adds to the model's answer.

    geo_prior: a location/date prior aligned to the model's classes; index: a similar-photo index made by the
    served model; thumbnails: serve small re-encoded copies of indexed photos by index id; extra_species: the
    user's species ranked with the model's (alone with only_extra); unknown_threshold: a best probability below
    it answers "unknown" (default: the extra species' calibrated threshold, else none)."""

    geo_prior: GeoPrior | None = None
    index: SimilarIndex | None = None
    thumbnails: bool = False
    extra_species: ExtraSpecies | None = None
    only_extra: bool = False
    unknown_threshold: float | None = None

    def __post_init__(self) -> None:
        check_addon_flags(self.extra_species, self.only_extra, self.index, self.thumbnails, self.unknown_threshold)

    @property
    def threshold(self) -> float | None:
        """The unknown threshold in force."""
        if self.unknown_threshold is not None:
            return self.unknown_threshold
        return None if self.extra_species is None else float(self.extra_species.unknown_threshold)

    @property
    def needs_embeddings(self) -> bool:
        return self.index is not None or self.extra_species is not None

    @classmethod
    def load(
        cls,
        class_names: Sequence[str],
        *,
        geo_prior: str | os.PathLike | None = None,
        index: str | os.PathLike | None = None,
        thumbnails: bool = False,
        extra_species: str | os.PathLike | None = None,
        only_extra: bool = False,
        unknown_threshold: float | None = None,
    ) -> Addons:
        """Read the files named by `hierax serve`'s flags (HieraxError with what to do when one is unusable);
        whether the index and the species were made by the served model is checked by create_app."""
        check_addon_flags(extra_species, only_extra, index, thumbnails, unknown_threshold)
        return cls(
            geo_prior=None if geo_prior is None else load_prior(geo_prior).for_classes(class_names),
            index=None if index is None else open_index(index),
            thumbnails=thumbnails,
            extra_species=None if extra_species is None else ExtraSpecies.load(extra_species),
            only_extra=only_extra,
            unknown_threshold=unknown_threshold,
        )


def check_addon_flags(
    extra_species: object, only_extra: bool, index: object, thumbnails: bool, unknown_threshold: float | None
) -> None:
    """HieraxError for flags that do not go together (checked before any file is read)."""
    if only_extra and extra_species is None:
        raise HieraxError("--only-extra needs --extra-species SPECIES.safetensors")
    if thumbnails and index is None:
        raise HieraxError("--thumbnails needs --index INDEX_DIR (thumbnails are of indexed photos only)")
    if unknown_threshold is not None and not 0.0 <= unknown_threshold <= 1.0:
        raise HieraxError(f"--unknown-threshold is a probability in [0, 1], not {unknown_threshold}")
