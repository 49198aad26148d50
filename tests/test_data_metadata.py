"""hierax.data.metadata: EXIF GPS, capture time and camera from files written with Pillow; CSV columns and
run-wide overrides; broken values that must count as "no location", never as an exception."""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
import struct
import subprocess
from fractions import Fraction

import pytest
from PIL import Image

from hierax.data.metadata import (
    BROKEN_GPS_REASONS,
    Capture,
    Overrides,
    capture_context,
    capture_time,
    parse_date,
    parse_gps,
    read_capture,
)
from hierax.errors import HieraxError

ASCII, SHORT, LONG, RATIONAL, DOUBLE = 2, 3, 4, 5, 12


def _ascii(text: str) -> tuple[int, bytes, int]:
    data = text.encode() + b"\0"
    return ASCII, data, len(data)


def _rationals(*pairs: tuple[int, int]) -> tuple[int, bytes, int]:
    return RATIONAL, b"".join(struct.pack("<II", n, d) for n, d in pairs), len(pairs)


def _doubles(*values: float) -> tuple[int, bytes, int]:
    return DOUBLE, b"".join(struct.pack("<d", v) for v in values), len(values)


def _ifd(entries: dict[int, tuple[int, bytes, int]], start: int) -> bytes:
    """One little-endian TIFF IFD at offset `start`, with its out-of-line values after it."""
    table, data = struct.pack("<H", len(entries)), b""
    data_start = start + 2 + 12 * len(entries) + 4
    for tag in sorted(entries):
        typ, payload, count = entries[tag]
        if len(payload) <= 4:
            table += struct.pack("<HHI", tag, typ, count) + payload.ljust(4, b"\0")
        else:
            table += struct.pack("<HHII", tag, typ, count, data_start + len(data))
            data += payload + b"\0" * (len(payload) % 2)
    return table + struct.pack("<I", 0) + data


def exif_blob(gps: dict | None = None, exif: dict | None = None, ifd0: dict | None = None) -> bytes:
    """Raw EXIF with any tag types (floats, zero denominators, text where numbers belong), which Pillow's own
    writer would not produce: IFD0, then the GPS IFD, then the Exif IFD."""
    ifd0 = dict(ifd0 or {})
    pointers = {0x8825: gps, 0x8769: exif}
    for tag, sub in pointers.items():
        if sub is not None:
            ifd0[tag] = (LONG, struct.pack("<I", 0), 1)
    first = _ifd(ifd0, 8)
    offset, subs = 8 + len(first), {}
    for tag, sub in pointers.items():
        if sub is not None:
            ifd0[tag] = (LONG, struct.pack("<I", offset), 1)
            subs[tag] = _ifd(sub, offset)
            offset += len(subs[tag])
    tiff = b"II*\0" + struct.pack("<I", 8) + _ifd(ifd0, 8) + b"".join(subs[t] for t in pointers if t in subs)
    return b"Exif\0\0" + tiff


def jpeg(tmp_path, name: str, exif: bytes | Image.Exif | None = None):
    path = tmp_path / name
    image = Image.new("RGB", (40, 30), (90, 140, 60))
    image.save(path, "JPEG", **({"exif": exif} if exif is not None else {}))
    return path


def dms(value: float) -> tuple[Fraction, Fraction, Fraction]:
    value = abs(value)
    degrees = int(value)
    minutes = int((value - degrees) * 60)
    seconds = round((value - degrees - minutes / 60) * 3600, 2)
    return Fraction(degrees), Fraction(minutes), Fraction(seconds).limit_denominator(100)


def pillow_exif(lat: float, lon: float, extra: dict | None = None) -> Image.Exif:
    exif = Image.Exif()
    exif[0x8825] = {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)}
    exif[0x010F], exif[0x0110] = "Reconyx", "HyperFire 2"
    exif[0x8769] = {0x9003: "2023:07:14 09:30:05", **(extra or {})}
    return exif


HEMISPHERES = [(-33.8688, 151.2093), (40.7128, -74.0060), (35.6762, 139.6503), (-34.6037, -58.3816)]


@pytest.mark.parametrize(("lat", "lon"), HEMISPHERES)
def test_rational_gps_in_all_four_hemispheres(tmp_path, lat, lon):
    path = jpeg(tmp_path, "gps.jpg", pillow_exif(lat, lon))
    capture = read_capture(path)
    assert capture.location_problem is None and capture.has_location
    assert capture.latitude == pytest.approx(lat, abs=1e-5)
    assert capture.longitude == pytest.approx(lon, abs=1e-5)
    assert (capture.make, capture.model) == ("Reconyx", "HyperFire 2")
    assert capture.time == dt.datetime(2023, 7, 14, 9, 30, 5)
    if shutil.which("exiftool"):  # an independent reader agrees
        out = subprocess.run(
            ["exiftool", "-n", "-json", "-GPSLatitude", "-GPSLongitude", str(path)], capture_output=True
        )
        tags = json.loads(out.stdout)[0]
        assert (tags["GPSLatitude"], tags["GPSLongitude"]) == pytest.approx((lat, lon), abs=1e-5)


def test_float_and_decimal_degree_encodings(tmp_path):
    doubles = {1: _ascii("S"), 2: _doubles(33.0, 51.0, 54.0), 3: _ascii("W"), 4: _doubles(70.0, 30.0, 0.0)}
    capture = read_capture(jpeg(tmp_path, "double.jpg", exif_blob(doubles)))
    assert (capture.latitude, capture.longitude) == pytest.approx((-(33 + 51 / 60 + 54 / 3600), -70.5))
    decimal = {1: _ascii("N"), 2: _rationals((4_512_345, 100_000)), 3: _ascii("E"), 4: _doubles(7.25)}
    capture = read_capture(jpeg(tmp_path, "decimal.jpg", exif_blob(decimal)))
    assert (capture.latitude, capture.longitude) == pytest.approx((45.12345, 7.25))
    # No reference tags: the values' own signs.
    signed = {2: _doubles(-12.5), 4: _doubles(-45.0)}
    assert read_capture(jpeg(tmp_path, "signed.jpg", exif_blob(signed))).latitude == -12.5


GOOD_LON = {3: _ascii("E"), 4: _rationals((10, 1), (0, 1), (0, 1))}
BROKEN = {
    "latitude over 90": ({1: _ascii("N"), 2: _rationals((95, 1), (0, 1), (0, 1)), **GOOD_LON}, "out_of_range"),
    "minutes over 60": ({1: _ascii("N"), 2: _rationals((45, 1), (75, 1), (0, 1)), **GOOD_LON}, "out_of_range"),
    "zero denominator": ({1: _ascii("N"), 2: _rationals((45, 1), (30, 0), (0, 1)), **GOOD_LON}, "zero_denominator"),
    "text for degrees": ({1: _ascii("N"), 2: _ascii("forty-five"), **GOOD_LON}, "unparseable"),
    "bad reference": ({1: _ascii("Q"), 2: _rationals((45, 1), (0, 1), (0, 1)), **GOOD_LON}, "bad_reference"),
    "latitude only": ({1: _ascii("N"), 2: _rationals((45, 1), (0, 1), (0, 1))}, "incomplete"),
    "void fix": ({1: _ascii("N"), 2: _rationals((45, 1), (0, 1), (0, 1)), 9: _ascii("V"), **GOOD_LON}, "void"),
    "null island": ({1: _ascii("N"), 2: _doubles(0.0), 3: _ascii("E"), 4: _doubles(0.0)}, "null_island"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_gps_is_no_location_with_a_reason(tmp_path, case):
    gps, reason = BROKEN[case]
    path = jpeg(tmp_path, "broken.jpg", exif_blob(gps, exif={0x9003: _ascii("2022:01:02 03:04:05")}))
    capture = read_capture(path)
    assert not capture.has_location and capture.latitude is None and capture.longitude is None
    assert capture.location_problem == reason
    assert reason in BROKEN_GPS_REASONS + ("null_island",) and capture.gps_warning
    assert capture.time == dt.datetime(2022, 1, 2, 3, 4, 5)  # the rest of the file still reads


def test_files_without_exif_gps_or_any_image(tmp_path):
    assert read_capture(jpeg(tmp_path, "plain.jpg")) == Capture(location_problem="no_exif")
    camera_only = read_capture(jpeg(tmp_path, "cam.jpg", exif_blob(ifd0={0x010F: _ascii("Bushnell")})))
    assert camera_only.location_problem == "no_gps" and camera_only.make == "Bushnell" and not camera_only.gps_warning
    (tmp_path / "notes.jpg").write_text("not a picture")
    for source in (tmp_path / "notes.jpg", tmp_path / "missing.jpg", b"", b"\xff\xd8\xff"):
        assert read_capture(source).location_problem == "unreadable"
    assert capture_time(tmp_path / "missing.jpg") is None


def test_header_only_bytes_and_open_images(tmp_path):
    noise = Image.effect_noise((320, 240), 60).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, "JPEG", exif=pillow_exif(*HEMISPHERES[0]), quality=95)
    data = buffer.getvalue()
    truncated = data[: len(data) // 2]  # half the pixels are cut off: only the header is read
    for source in (data, truncated, Image.open(io.BytesIO(data))):
        assert read_capture(source).latitude == pytest.approx(HEMISPHERES[0][0], abs=1e-5)


def test_capture_time_with_offset_and_sub_seconds_and_fallbacks(tmp_path):
    extra = {0x9011: "-05:00", 0x9291: "37"}
    stamp = capture_time(jpeg(tmp_path, "t.jpg", pillow_exif(10, 10, extra)))
    assert stamp == dt.datetime(2023, 7, 14, 9, 30, 5, 370000, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    zeros = exif_blob(exif={0x9003: _ascii("0000:00:00 00:00:00")}, ifd0={0x0132: _ascii("2020:02:29 23:59:59")})
    capture = read_capture(jpeg(tmp_path, "fallback.jpg", zeros))
    assert (capture.time, capture.time_tag) == (dt.datetime(2020, 2, 29, 23, 59, 59), "DateTime")
    nothing = exif_blob(exif={0x9003: _ascii("garbage")})
    assert capture_time(jpeg(tmp_path, "none.jpg", nothing)) is None


def test_parse_helpers():
    assert parse_date("2021-05-04") == dt.date(2021, 5, 4)
    assert parse_date("2010-07-05 00:00:00+00:00") == dt.date(2010, 7, 5)
    assert parse_date("2019:12:31 23:00:00") == dt.date(2019, 12, 31)
    assert parse_date(dt.datetime(2001, 2, 3, 4, 5)) == dt.date(2001, 2, 3)
    assert parse_date("2021-02-30") is None and parse_date("yesterday") is None and parse_date(None) is None
    assert parse_gps({}) == (None, None, "no_gps")
    assert parse_gps({2: (45.5,), 4: (Fraction(-1, 2),)}) == (45.5, -0.5, None)
    assert parse_gps({1: b"S\0", 2: ((10, 1), (30, 1), (0, 1)), 3: "W", 4: "120 15 0"}) == (-10.5, -120.25, None)


def test_precedence_overrides_then_csv_then_exif(tmp_path):
    photo = jpeg(tmp_path, "gps.jpg", pillow_exif(-33.8688, 151.2093))
    exif_only = capture_context(photo)
    assert (exif_only.location_source, exif_only.date_source) == ("exif", "exif")
    assert exif_only.date == dt.date(2023, 7, 14) and exif_only.latitude == pytest.approx(-33.8688, abs=1e-5)

    row = {"path": "gps.jpg", "Latitude": " 51.5 ", "longitude": "-0.12", "date": "2024-03-01"}
    from_csv = capture_context(photo, row)
    assert (from_csv.latitude, from_csv.longitude, from_csv.date) == (51.5, -0.12, dt.date(2024, 3, 1))
    assert (from_csv.location_source, from_csv.date_source, from_csv.warnings) == ("csv", "csv", ())

    date_only = Overrides.from_args(date="2025-12-24")
    mixed = capture_context(photo, {"latitude": "1", "longitude": "2"}, date_only)
    assert (mixed.location_source, mixed.date_source, mixed.date) == ("csv", "override", dt.date(2025, 12, 24))

    everything = Overrides.from_args([10.0, 20.0], "2020-01-01")
    ruled = capture_context(tmp_path / "never-read.jpg", row, everything)
    assert (ruled.latitude, ruled.longitude, ruled.date) == (10.0, 20.0, dt.date(2020, 1, 1))
    assert (ruled.location_source, ruled.date_source, ruled.warnings) == ("override", "override", ())


def test_broken_csv_values_fall_back_with_warnings(tmp_path):
    photo = jpeg(tmp_path, "gps.jpg", pillow_exif(40.7128, -74.0060))
    for row in ({"latitude": "north", "longitude": "3"}, {"latitude": "95", "longitude": "3"}, {"latitude": "5"}):
        ctx = capture_context(photo, {**row, "date": "someday"})
        assert ctx.location_source == "exif" and ctx.latitude == pytest.approx(40.7128, abs=1e-5)
        assert ctx.date_source == "exif" and len(ctx.warnings) == 2
    blank = capture_context(photo, {"latitude": "", "longitude": " ", "date": ""})
    assert blank.location_source == "exif" and blank.warnings == ()
    broken_exif = jpeg(tmp_path, "broken.jpg", exif_blob(BROKEN["zero denominator"][0]))
    ctx = capture_context(broken_exif, {"latitude": "x", "longitude": "y"})
    assert not ctx.has_location and ctx.location_source == "" and len(ctx.warnings) == 2
    assert "zero denominator" in ctx.warnings[1]
    assert capture_context(None, None, None) == capture_context()


def test_override_arguments_are_checked():
    assert Overrides.from_args([-90, 180]).has_location
    with pytest.raises(HieraxError, match="off the globe"):
        Overrides.from_args([151.2, -33.8])  # longitude first by mistake
    with pytest.raises(HieraxError, match="YYYY-MM-DD"):
        Overrides.from_args(date="14/07/2023")
    with pytest.raises(HieraxError, match="two numbers"):
        Overrides.from_args([1.0])
