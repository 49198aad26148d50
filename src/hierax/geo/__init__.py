"""Where and when: a location/date presence prior (SINR-style) that re-weights an image model's species.

prior = load_prior("prior.safetensors")          # fitted by `hierax geoprior fit` or fit_prior
presence = prior.presence(lat, lon, date=None)   # (N, C) probabilities for the image model's classes
probs = combine(probs, presence)                 # p_i * max(presence_i, floor), renormalised
probs, applied = apply_prior(prior, probs, lats, lons, dates)   # rows without a location unchanged
"""

from hierax.geo.annotations import FitSummary, Records, read_annotations
from hierax.geo.classes import read_class_names
from hierax.geo.fit import FitConfig, fit_prior
from hierax.geo.model import DEFAULT_FLOOR, GeoPrior, PresenceNet, apply_prior, combine, load_prior

__all__ = [
    "DEFAULT_FLOOR",
    "FitConfig",
    "FitSummary",
    "GeoPrior",
    "PresenceNet",
    "Records",
    "apply_prior",
    "combine",
    "fit_prior",
    "load_prior",
    "read_annotations",
    "read_class_names",
]
