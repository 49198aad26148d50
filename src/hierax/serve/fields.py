"""What a request says besides its image: the place and date for the location prior, from form fields or the
query string (form fields win), checked before they reach `hierax.data.metadata.capture_context` as its row."""

from __future__ import annotations

import math
from collections.abc import Mapping

from hierax.data.metadata import parse_date
from hierax.serve.upload import ApiError


def _number_field(fields: Mapping[str, str], name: str, default: float | None, bound: float) -> float | None:
    text = fields.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and abs(value) <= bound):
        raise ApiError(422, "invalid_request", f"{name} '{text}' is not a number in [-{bound:g}, {bound:g}]")
    return value


def request_place(
    lat: float | None, lon: float | None, date: str | None, fields: Mapping[str, str]
) -> dict[str, str] | None:
    """The place and date a request gives (form fields win over query parameters) as a capture_context row;
    ApiError 422 for half a location or a date that is not one."""
    lat = _number_field(fields, "lat", lat, 90.0)
    lon = _number_field(fields, "lon", lon, 180.0)
    if (lat is None) != (lon is None):
        raise ApiError(422, "invalid_request", "give both lat and lon (decimal degrees), or neither")
    text = fields.get("date", "").strip() or (date or "").strip()
    day = parse_date(text) if text else None
    if text and day is None:
        raise ApiError(422, "invalid_request", f"date '{text}' is not a date: write it as YYYY-MM-DD")
    row = {} if lat is None else {"latitude": repr(lat), "longitude": repr(lon)}
    if day is not None:
        row["date"] = day.isoformat()
    return row or None
