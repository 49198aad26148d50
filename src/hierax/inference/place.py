"""Where and when each image of a batch job was taken, and the location prior as a probability step.

The DataLoader workers put each decoded image's `CaptureContext` into its meta (`hierax.data.datasets`: run-wide
overrides, then the input CSV's latitude/longitude/date columns, then the file's EXIF). From there:
- `GeoStep` re-weights a batch's probabilities by `hierax.geo.apply_prior` (rows without a location keep the
  image-only answer), before top-k, taxonomy and roll-up see them;
- `place_values` gives a row's PLACE_COLUMNS;
- `PlaceTally` counts the images with a location and those whose metadata had broken values (each named in the
  log), for the run's summary line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hierax.data.datasets import CAPTURE_KEY
from hierax.data.metadata import CaptureContext
from hierax.geo import DEFAULT_FLOOR, GeoPrior, apply_prior, load_prior
from hierax.inference.loading import BatchResult
from hierax.weights.files import ModelInfo

logger = logging.getLogger(__name__)

PLACE_COLUMNS = ["latitude", "longitude", "date", "location_source", "geo_prior_applied"]
_NOWHERE = CaptureContext()


def capture_of(meta: Mapping) -> CaptureContext:
    """The CaptureContext the loader found for one image (an empty one when it looked for none)."""
    return meta.get(CAPTURE_KEY) or _NOWHERE


def load_geo_prior(prior: str | os.PathLike | GeoPrior) -> GeoPrior:
    """A prior file read (CheckpointError when missing or not a prior), or a loaded prior as it is."""
    return prior if isinstance(prior, GeoPrior) else load_prior(prior)


def prior_for_model(prior: GeoPrior, info: ModelInfo) -> GeoPrior:
    """The prior aligned to the model's classes; HieraxError when it shares none with them (a prior fitted for
    another model). Classes it has no records of are left as the image says, and their number is logged."""
    aligned = prior.for_classes(info.class_names)
    covered = len(aligned.columns)
    if covered < info.num_classes:
        logger.warning(
            "the geo prior knows %d of the model's %d classes; the others are not re-weighted",
            covered,
            info.num_classes,
        )
    return aligned


@dataclass
class GeoStep:
    """A probability step: each row re-weighted by the prior at its image's place and date (see
    hierax.geo.combine for the rule and its floor); rows without a location are left as they are. `applied`
    counts the rows it has re-weighted, for a run's summary."""

    prior: GeoPrior
    floor: float = DEFAULT_FLOOR
    applied: int = 0

    def __call__(self, probs: np.ndarray, result: BatchResult) -> np.ndarray:
        places = [capture_of(m) for m in result.meta]
        combined, applied = apply_prior(
            self.prior,
            probs,
            [p.latitude for p in places],
            [p.longitude for p in places],
            [p.date for p in places],
            self.floor,
        )
        self.applied += int(applied.sum())
        return combined


def place_values(context: CaptureContext, prior_applied: bool) -> dict[str, Any]:
    """A row's PLACE_COLUMNS: degrees, ISO date, where the location came from (override, csv, exif) and
    whether the prior re-weighted it; None where unknown."""
    return {
        "latitude": None if context.latitude is None else round(context.latitude, 6),
        "longitude": None if context.longitude is None else round(context.longitude, 6),
        "date": context.date.isoformat() if context.date else None,
        "location_source": context.location_source or None,
        "geo_prior_applied": prior_applied,
    }


@dataclass
class PlaceTally:
    """Images seen with a location, and images whose place or date metadata had broken values."""

    located: int = 0
    warned: int = 0

    def add(self, result: BatchResult) -> None:
        """Count a batch's decoded images and log each broken value by path."""
        for path, meta in zip(result.paths, result.meta):
            context = capture_of(meta)
            self.located += context.has_location
            if context.warnings:
                self.warned += 1
                logger.warning("%s: %s", path, "; ".join(context.warnings))
