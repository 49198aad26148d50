"""Events: frames grouped per camera by capture time (file time as a flagged fallback), one combined answer and
the largest count per event, written through hierax's writers."""

from __future__ import annotations

import datetime as dt

import pytest

from hierax.data.taxonomy import Taxonomy
from hierax.inference import writers
from hierax.interchange.events import (
    CaptureTime,
    camera_of,
    capture_times,
    event_columns,
    event_rows,
    group_events,
    summarise_events,
)
from hierax.interchange.megadetector import local_path, read_detections
from hierax.interchange.results import Classification

from .interchange_support import CLASS_NAMES, COMMON, START, classify_detections, make_camera_folder


def _times(md, root, exif=None):
    return capture_times([local_path(root, f.file) for f in md.frames], exif)


def test_capture_times_prefer_the_reader_and_flag_file_times(tmp_path):
    md = read_detections(make_camera_folder(tmp_path))
    exif = [START - dt.timedelta(hours=1)] + [None] * (len(md.frames) - 1)
    times = _times(md, tmp_path, exif)
    assert times[0] == CaptureTime(START - dt.timedelta(hours=1), "exif")
    assert times[1] == CaptureTime(START + dt.timedelta(seconds=2), "file")
    assert times[-1] == CaptureTime(None, "")  # listed by the detector, not on disk
    assert capture_times([tmp_path / "cam1" / "IMG_0002.JPG"], file_time_fallback=False) == [CaptureTime(None, "")]
    with pytest.raises(ValueError):
        capture_times(["a", "b"], [None])


def test_grouping_per_camera_with_a_gap(tmp_path):
    md = read_detections(make_camera_folder(tmp_path))
    cameras = [camera_of(f.file) for f in md.frames]
    assert cameras[:2] == ["cam1", "cam1"] and camera_of("top.jpg") == "" and camera_of("a\\b\\c.jpg") == "a/b"
    times = _times(md, tmp_path)
    events = group_events(cameras, times)
    assert [e.frames for e in events] == [(0, 1, 2), (3,), (4, 5), (6, 7), (8,)]
    assert [e.camera for e in events] == ["cam1", "cam1", "cam2", "cam2", "cam2"]
    assert events[0].start == START and events[0].end == START + dt.timedelta(seconds=4)
    assert [e.time_source for e in events] == ["file", "file", "file", "file", ""]
    assert len({e.id for e in events}) == len(events)
    assert [e.frames for e in group_events(cameras, times, gap_s=1000)][:2] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    # Aware and naive times: aware ones are compared in UTC.
    tz = dt.timezone(dt.timedelta(hours=2))
    mixed = [
        CaptureTime(dt.datetime(2024, 1, 1, 12, 0, tzinfo=tz), "exif"),
        CaptureTime(dt.datetime(2024, 1, 1, 10, 0, 30), "exif"),
    ]
    assert [e.frames for e in group_events(["c", "c"], mixed)] == [(0, 1)]


def test_combined_species_rolls_up_and_counts_the_most_in_one_frame():
    taxonomy = Taxonomy(CLASS_NAMES, COMMON)
    fox_or_arctic = Classification((0, 1), (0.6, 0.3))
    cat = Classification((2,), (0.9,))
    events = group_events(["c"] * 3, [CaptureTime(START + dt.timedelta(seconds=s), "exif") for s in (0, 5, 9)])
    detections = {0: [(0.9, fox_or_arctic)], 1: [(0.3, cat), (0.9, fox_or_arctic)], 2: []}
    (summary,) = summarise_events(
        events, detections, taxonomy, k=3, rollup=True, thresholds={"species": 0.8, "genus": 0.6}
    )
    # mean weighted by confidence: fox (0.9*0.6*2)/2.1, arctic fox (0.9*0.3*2)/2.1, cat 0.3*0.9/2.1
    assert summary.classification.indices == (0, 1, 2)
    assert summary.classification.probs == pytest.approx((1.08 / 2.1, 0.54 / 2.1, 0.27 / 2.1))
    assert (summary.answer.rank, summary.answer.name) == ("genus", "Vulpes")
    assert summary.answer.probability == pytest.approx(1.62 / 2.1)
    assert summary.answer.lineage == ("Animalia", "Chordata", "Mammalia", "Carnivora", "Canidae", "Vulpes")
    assert (summary.detections, summary.count) == (3, 2)
    (plain,) = summarise_events(events, detections, taxonomy, k=1)
    assert (plain.answer.name, plain.answer.rank, plain.answer.common_name) == ("Vulpes vulpes", "species", "red fox")
    fox_or_raven = Classification((0, 4), (0.35, 0.35))
    (unsure,) = summarise_events(events, {0: [(0.5, fox_or_raven)]}, taxonomy, rollup=True)
    assert unsure.answer.name == "" and unsure.answer.rank == ""  # no family reaches its 0.4 by default
    (empty,) = summarise_events(events, {}, taxonomy)
    assert empty.answer is None and empty.count == 0


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_events_table_through_the_writers(tmp_path, suffix):
    md_path = make_camera_folder(tmp_path)
    md, results, failures, taxonomy = classify_detections(md_path, tmp_path)
    events = group_events([camera_of(f.file) for f in md.frames], _times(md, tmp_path))
    detections = {}
    for (frame, det), c in results.items():
        detections.setdefault(frame, []).append((md.frames[frame].detections[det].conf, c))
    summaries = summarise_events(events, detections, taxonomy, k=3, rollup=True)
    rows = event_rows(summaries, taxonomy, 3)
    out = tmp_path / f"events{suffix}"
    writers.write_all(out, rows, event_columns(3))
    back = writers.read_rows(out)
    assert [r["event_id"] for r in back] == [e.id for e in events]
    assert [int(r["count"]) for r in back] == [2, 3, 0, 1, 0]
    assert [int(r["detections"]) for r in back] == [3, 3, 0, 1, 0]
    assert back[0]["start"] == START.isoformat() and back[0]["time_source"] == "file"
    assert back[0]["name"] == summaries[0].answer.name and back[0]["label_1"] in CLASS_NAMES
