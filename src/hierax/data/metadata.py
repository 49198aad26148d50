"""What a file says about its capture (EXIF GPS position, DateTimeOriginal, camera), and where and when each
image of a run was taken once CSV columns and run-wide overrides are taken into account.

API:
    read_capture(source) -> Capture        source: a path, encoded bytes or an open PIL image; never raises
    capture_time(source) -> datetime | None   DateTimeOriginal (+ OffsetTimeOriginal, SubSecTimeOriginal)
    parse_gps(gps_ifd) -> (lat, lon, None) or (None, None, reason)
    parse_date(value) -> date | None       ISO dates, ISO date-times, EXIF "YYYY:MM:DD HH:MM:SS"
    Overrides.from_args(location, date)    `--location LAT LON`, `--date YYYY-MM-DD` (HieraxError when invalid)
    capture_context(source, row, overrides) -> CaptureContext   the effective latitude, longitude and date

Precedence, per field (the location as a pair, the date on its own): run-wide overrides > the CSV row's
`latitude`/`longitude`/`date` columns > the file's EXIF. A broken value in one source is reported in
`warnings` and the next source is used, so no image is ever lost over its metadata.

Only the file's header is read (Pillow's lazy `Image.open` + `getexif()`); pixels are never decoded.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from hierax.errors import HieraxError

GPS_IFD = 0x8825
EXIF_IFD = 0x8769
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON, _GPS_STATUS = 1, 2, 3, 4, 9
_MAKE, _MODEL, _DATETIME = 0x010F, 0x0110, 0x0132
_DATETIME_ORIGINAL, _DATETIME_DIGITIZED = 0x9003, 0x9004
_OFFSET_ORIGINAL, _OFFSET_DIGITIZED, _OFFSET = 0x9011, 0x9012, 0x9010
_SUBSEC_ORIGINAL, _SUBSEC_DIGITIZED, _SUBSEC = 0x9291, 0x9292, 0x9290

# Why a file has no location. The first two are ordinary (a photo without GPS); the others are broken values,
# reported as warnings.
NO_EXIF, NO_GPS = "no_exif", "no_gps"
BROKEN_GPS_REASONS = ("incomplete", "bad_reference", "zero_denominator", "unparseable", "out_of_range", "void")
NULL_ISLAND = "null_island"  # exactly (0, 0): what receivers without a fix write
UNREADABLE = "unreadable"

_TIME_TAGS = (  # (date-time tag, its offset tag, its sub-second tag, the IFD it lives in)
    (_DATETIME_ORIGINAL, _OFFSET_ORIGINAL, _SUBSEC_ORIGINAL, EXIF_IFD),
    (_DATETIME_DIGITIZED, _OFFSET_DIGITIZED, _SUBSEC_DIGITIZED, EXIF_IFD),
    (_DATETIME, _OFFSET, _SUBSEC, None),
)
_EXIF_TIME = re.compile(r"^\s*(\d{4})[:\-/](\d{2})[:\-/](\d{2})(?:[ T](\d{2}):(\d{2})(?::(\d{2}))?)?")
_OFFSET_TEXT = re.compile(r"^\s*([+-])(\d{2}):?(\d{2})\s*$")


@dataclass(frozen=True)
class Capture:
    """What one file's EXIF says. `location_problem` says why there is no location (None when there is one):
    no_exif, no_gps, null_island, unreadable, or one of BROKEN_GPS_REASONS."""

    latitude: float | None = None
    longitude: float | None = None
    location_problem: str | None = NO_EXIF
    time: dt.datetime | None = None  # aware when the file has an OffsetTime tag, else the camera's local time
    time_tag: str | None = None  # DateTimeOriginal, DateTimeDigitized or DateTime
    make: str | None = None
    model: str | None = None

    @property
    def has_location(self) -> bool:
        return self.latitude is not None and self.longitude is not None

    @property
    def gps_warning(self) -> str | None:
        """A message for a GPS block that is present but unusable (None for a good or an absent one)."""
        if self.location_problem in BROKEN_GPS_REASONS or self.location_problem == NULL_ISLAND:
            return f"EXIF GPS ignored: {self.location_problem.replace('_', ' ')}"
        return None


class _GPSProblem(Exception):
    """Why a GPS value cannot be used (one of BROKEN_GPS_REASONS), raised inside parse_gps only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _text(value: Any) -> str | None:
    """An EXIF ASCII value as clean text (bytes decoded, NULs and spaces stripped); None when empty."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "").strip()
    return value or None


def _number(value: Any) -> float:
    """One EXIF number: IFDRational, int, float, a (numerator, denominator) pair or numeric text."""
    if isinstance(value, tuple | list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        if value[1] == 0:
            raise _GPSProblem("zero_denominator")
        return value[0] / value[1]
    if getattr(value, "denominator", 1) == 0:  # Pillow's IFDRational with a zero denominator (reads as nan)
        raise _GPSProblem("zero_denominator")
    try:
        number = float(_text(value) or "nan") if isinstance(value, bytes | str) else float(value)
    except (TypeError, ValueError):
        raise _GPSProblem("unparseable") from None
    if not math.isfinite(number):
        raise _GPSProblem("unparseable")
    return number


def _degrees(value: Any) -> float:
    """Degrees from an EXIF coordinate: (deg, min, sec) rationals or floats, a shorter sequence, one number or
    text such as "12.5" or "12 30 15". Minutes and seconds must lie in [0, 60)."""
    if isinstance(value, bytes | str):
        text = _text(value) or ""
        parts: Sequence[Any] = [p for p in re.split(r"[\s,]+", text) if p]
    elif isinstance(value, tuple | list) and not (len(value) == 2 and all(isinstance(v, int) for v in value)):
        parts = value
    else:
        parts = [value]
    if not 1 <= len(parts) <= 3:
        raise _GPSProblem("unparseable")
    numbers = [_number(p) for p in parts]
    if any(n < 0 or n >= 60 for n in numbers[1:]):
        raise _GPSProblem("out_of_range")  # minutes or seconds
    sign = -1.0 if numbers[0] < 0 else 1.0
    return sign * (abs(numbers[0]) + sum(n / 60**i for i, n in enumerate(numbers[1:], start=1)))


def _apply_ref(degrees: float, ref: Any, negative: str, positive: str) -> float:
    text = (_text(ref) or "").upper()
    if not text:
        return degrees  # no reference: the value's own sign (what writers that omit the tag mean)
    if text[0] == negative:
        return -abs(degrees)
    if text[0] == positive:
        return abs(degrees)
    raise _GPSProblem("bad_reference")


def parse_gps(gps: Mapping[int, Any] | None) -> tuple[float | None, float | None, str | None]:
    """(latitude, longitude, None) in signed decimal degrees from an EXIF GPS IFD, or (None, None, reason).
    Handles rationals and floats, DMS or decimal degrees, all four hemispheres; never raises."""
    if not gps:
        return None, None, NO_GPS
    if _GPS_LAT not in gps and _GPS_LON not in gps:
        return None, None, NO_GPS
    if _GPS_LAT not in gps or _GPS_LON not in gps:
        return None, None, "incomplete"
    if (_text(gps.get(_GPS_STATUS)) or "A").upper().startswith("V"):
        return None, None, "void"
    try:
        lat = _apply_ref(_degrees(gps[_GPS_LAT]), gps.get(_GPS_LAT_REF), "S", "N")
        lon = _apply_ref(_degrees(gps[_GPS_LON]), gps.get(_GPS_LON_REF), "W", "E")
    except _GPSProblem as problem:
        return None, None, problem.reason
    except (TypeError, ValueError):
        return None, None, "unparseable"
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        return None, None, "out_of_range"
    if lat == 0.0 and lon == 0.0:
        return None, None, NULL_ISLAND
    return lat, lon, None


def _parse_offset(value: Any) -> dt.timezone | None:
    match = _OFFSET_TEXT.match(_text(value) or "")
    if not match:
        return None
    sign, hours, minutes = match.groups()
    delta = dt.timedelta(hours=int(hours), minutes=int(minutes))
    if delta >= dt.timedelta(hours=24):
        return None
    return dt.timezone(-delta if sign == "-" else delta)


def parse_exif_datetime(value: Any, offset: Any = None, subsec: Any = None) -> dt.datetime | None:
    """An EXIF date-time ("YYYY:MM:DD HH:MM:SS", also with - or / between date parts), aware when `offset`
    ("+02:00") is valid, with `subsec` digits as fractions of a second; None for blanks and impossible dates
    ("0000:00:00 00:00:00")."""
    match = _EXIF_TIME.match(_text(value) or "")
    if not match:
        return None
    year, month, day, hour, minute, second = (int(g) if g else 0 for g in match.groups())
    digits = re.sub(r"\D", "", _text(subsec) or "")[:6]
    micro = int(digits.ljust(6, "0")) if digits else 0
    try:
        stamp = dt.datetime(year, month, day, hour, minute, second, micro)
    except ValueError:
        return None
    tz = _parse_offset(offset)
    return stamp.replace(tzinfo=tz) if tz else stamp


def parse_date(value: Any) -> dt.date | None:
    """A calendar date from a date, a datetime, or text: "YYYY-MM-DD", an ISO date-time (iNat21's
    "2010-07-05 00:00:00+00:00"), or an EXIF date-time. None for anything else (never raises)."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if value is not None and not isinstance(value, str | bytes):
        value = str(value)  # e.g. numpy.datetime64, whose text is ISO
    stamp = parse_exif_datetime(value)
    return stamp.date() if stamp else None


def _open(source: str | os.PathLike | bytes | Image.Image) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, bytes | bytearray | memoryview):
        return Image.open(io.BytesIO(bytes(source)))
    return Image.open(os.fspath(source))


def _read_time(exif: Image.Exif) -> tuple[dt.datetime | None, str | None]:
    names = {_DATETIME_ORIGINAL: "DateTimeOriginal", _DATETIME_DIGITIZED: "DateTimeDigitized", _DATETIME: "DateTime"}
    sub = exif.get_ifd(EXIF_IFD)
    for tag, offset_tag, subsec_tag, ifd in _TIME_TAGS:
        where = sub if ifd == EXIF_IFD else exif
        stamp = parse_exif_datetime(where.get(tag), sub.get(offset_tag), sub.get(subsec_tag))
        if stamp is not None:
            return stamp, names[tag]
    return None, None


def read_capture(source: str | os.PathLike | bytes | Image.Image) -> Capture:
    """The capture metadata of a file (path or bytes) or of an open PIL image. A file that cannot be opened
    gives Capture(location_problem="unreadable"); a broken GPS block gives its reason. Never raises."""
    try:
        image = _open(source)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return Capture(location_problem=UNREADABLE)
    try:
        exif = image.getexif()
        if not exif:
            return Capture(location_problem=NO_EXIF)
        try:
            gps = exif.get_ifd(GPS_IFD)
        except (KeyError, TypeError, ValueError, OSError):
            gps = None
        lat, lon, problem = parse_gps(gps)
        if problem == NO_GPS and GPS_IFD in exif and not gps:
            problem = "unparseable"  # a GPS pointer to nothing readable
        time, tag = _read_time(exif)
        return Capture(lat, lon, problem, time, tag, _text(exif.get(_MAKE)), _text(exif.get(_MODEL)))
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error):
        return Capture(location_problem=UNREADABLE)
    finally:
        if image is not source:
            image.close()


def capture_time(source: str | os.PathLike | bytes | Image.Image) -> dt.datetime | None:
    """When the photo was taken: DateTimeOriginal, else DateTimeDigitized, else DateTime, with sub-seconds
    and the UTC offset when the file has them (an aware datetime then). None when the file says nothing."""
    return read_capture(source).time


@dataclass(frozen=True)
class Overrides:
    """Run-wide values that win over every per-image source (`--location LAT LON`, `--date YYYY-MM-DD`)."""

    latitude: float | None = None
    longitude: float | None = None
    date: dt.date | None = None

    @classmethod
    def from_args(cls, location: Sequence[float] | None = None, date: str | dt.date | None = None) -> Overrides:
        """Check command-line values: HieraxError for a location off the globe or a date that is not a date."""
        lat = lon = None
        if location is not None:
            if len(location) != 2:
                raise HieraxError("--location takes two numbers: LATITUDE LONGITUDE (decimal degrees)")
            lat, lon = float(location[0]), float(location[1])
            if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
                raise HieraxError(
                    f"--location {lat:g} {lon:g} is off the globe: latitude must lie in [-90, 90] and longitude "
                    "in [-180, 180] (LATITUDE first)"
                )
        day = None
        if date is not None:
            day = parse_date(date)
            if day is None:
                raise HieraxError(f"--date '{date}' is not a date: write it as YYYY-MM-DD")
        return cls(lat, lon, day)

    @property
    def has_location(self) -> bool:
        return self.latitude is not None and self.longitude is not None


@dataclass(frozen=True)
class CaptureContext:
    """Where and when one image was taken, as the run will use it. `location_source` and `date_source` are
    "override", "csv", "exif" or "" (none); `warnings` lists broken values that were skipped."""

    latitude: float | None = None
    longitude: float | None = None
    date: dt.date | None = None
    location_source: str = ""
    date_source: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def has_location(self) -> bool:
        return self.latitude is not None and self.longitude is not None


def _column(row: Mapping[str, Any], name: str) -> str | None:
    """A CSV cell by column name (case- and space-insensitive); None when absent or blank."""
    for key, value in row.items():
        if str(key).strip().lower() == name:
            text = "" if value is None else str(value).strip()
            return text or None
    return None


def _csv_location(row: Mapping[str, Any], warnings: list[str]) -> tuple[float, float] | None:
    lat_text, lon_text = _column(row, "latitude"), _column(row, "longitude")
    if lat_text is None and lon_text is None:
        return None
    if lat_text is None or lon_text is None:
        warnings.append("CSV location ignored: latitude and longitude must both be given")
        return None
    try:
        lat, lon = float(lat_text), float(lon_text)
    except ValueError:
        warnings.append(f"CSV location ignored: '{lat_text}', '{lon_text}' are not numbers")
        return None
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        warnings.append(f"CSV location ignored: ({lat_text}, {lon_text}) is off the globe")
        return None
    return lat, lon


def capture_context(
    source: str | os.PathLike | bytes | Image.Image | None = None,
    row: Mapping[str, Any] | None = None,
    overrides: Overrides | None = None,
    *,
    capture: Capture | None = None,
) -> CaptureContext:
    """The effective location and date of one image: overrides > CSV row columns (`latitude`, `longitude`,
    `date`) > EXIF (`capture`, else read from `source` only when the other sources leave a field open)."""
    overrides = overrides or Overrides()
    row = row or {}
    warnings: list[str] = []
    location, location_source = None, ""
    if overrides.has_location:
        location, location_source = (overrides.latitude, overrides.longitude), "override"
    elif (found := _csv_location(row, warnings)) is not None:
        location, location_source = found, "csv"
    date, date_source = None, ""
    if overrides.date is not None:
        date, date_source = overrides.date, "override"
    elif (text := _column(row, "date")) is not None:
        date = parse_date(text)
        date_source = "csv" if date else ""
        if date is None:
            warnings.append(f"CSV date ignored: '{text}' is not a date (YYYY-MM-DD)")
    if (location is None or date is None) and (capture is not None or source is not None):
        capture = capture if capture is not None else read_capture(source)  # type: ignore[arg-type]
        if location is None and capture.has_location:
            location, location_source = (capture.latitude, capture.longitude), "exif"
        elif location is None and capture.gps_warning:
            warnings.append(capture.gps_warning)
        if date is None and capture.time is not None:
            date, date_source = capture.time.date(), "exif"
    lat, lon = location if location is not None else (None, None)
    return CaptureContext(lat, lon, date, location_source, date_source, tuple(warnings))
