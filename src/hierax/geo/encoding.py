"""The presence model's inputs: longitude, latitude and (optionally) the day of the year, each mapped to a sine
and a cosine so that the date line, the poles and New Year's Eve are no edges.

    features = [sin(pi lon/180), cos(pi lon/180), sin(pi lat/90), cos(pi lat/90)]           (4 inputs)
             + [sin(2 pi d), cos(2 pi d)] with d = (day of year - 1) / days in that year      (6 inputs)

Background points for the loss are drawn uniformly over the sphere's area (not over the lat/lon rectangle,
which would crowd them at the poles) and uniformly over the year.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hierax.data.metadata import parse_date

LOCATION_FEATURES = 4
DATE_FEATURES = 2
ENCODING = "sincos-v1"  # the name stored in prior files; change it when the formula above changes
# Days at which an undated query is evaluated when the prior uses the date: the middle of each month.
MID_MONTHS = tuple((dt.date(2021, m, 15).timetuple().tm_yday - 1) / 365 for m in range(1, 13))


def num_features(use_date: bool) -> int:
    return LOCATION_FEATURES + (DATE_FEATURES if use_date else 0)


def day_fraction(value: Any) -> float:
    """(day of year - 1) / days in that year, in [0, 1), for a date, datetime or date text; NaN when None or
    unparseable."""
    day = parse_date(value)
    if day is None:
        return math.nan
    days = 366 if (day.year % 4 == 0 and day.year % 100 != 0) or day.year % 400 == 0 else 365
    return (day.timetuple().tm_yday - 1) / days


def day_fractions(dates: Sequence[Any] | Any, n: int) -> np.ndarray:
    """Day fractions for `n` rows: one date (or None) for all of them, or one per row (None allowed)."""
    if dates is None or isinstance(dates, str | dt.date):
        return np.full(n, day_fraction(dates), dtype=np.float64)
    values = np.array([day_fraction(d) for d in dates], dtype=np.float64)
    if len(values) != n:
        raise ValueError(f"{len(values)} dates for {n} locations")
    return values


def encode(lat: torch.Tensor, lon: torch.Tensor, day: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 4) features of latitudes and longitudes in degrees, (N, 6) with day fractions in [0, 1)."""
    lon_rad = lon * (math.pi / 180.0)
    lat_rad = lat * (math.pi / 90.0)
    parts = [torch.sin(lon_rad), torch.cos(lon_rad), torch.sin(lat_rad), torch.cos(lat_rad)]
    if day is not None:
        day_rad = day * (2.0 * math.pi)
        parts += [torch.sin(day_rad), torch.cos(day_rad)]
    return torch.stack(parts, dim=-1)


def random_points(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` (lat, lon, day fraction) drawn uniformly over the sphere's area and the year."""
    u = torch.rand(3, n, generator=generator, dtype=torch.float64)
    lat = torch.rad2deg(torch.asin(2.0 * u[0] - 1.0))
    lon = 360.0 * u[1] - 180.0
    return lat.float(), lon.float(), u[2].float()
