"""Per-detection rows and the per-image summary, through hierax's CSV / JSONL / Parquet writers."""

from __future__ import annotations

import pytest

from hierax.inference import writers
from hierax.interchange.events import camera_of, capture_times, group_events
from hierax.interchange.megadetector import local_path
from hierax.interchange.results import answer
from hierax.interchange.rows import detection_columns, detection_rows, summary_columns, summary_rows

from .interchange_support import CLASS_NAMES, classify_detections, make_camera_folder


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_detection_rows_round_trip(tmp_path, suffix):
    md, results, _, taxonomy = classify_detections(make_camera_folder(tmp_path), tmp_path, k=3)
    columns = detection_columns(3, taxonomy, rollup=True)
    rows = detection_rows(md, results, taxonomy, root=tmp_path, k=3, rollup=True)
    assert len(rows) == len(results) == 7
    first = rows[0]
    assert first["path"] == str(tmp_path / "cam1" / "IMG_0001.JPG") and first["file"] == "cam1/IMG_0001.JPG"
    assert (first["detection"], first["category"], first["detection_conf"]) == (0, "animal", 0.93)
    assert [first[c] for c in ("bbox_x", "bbox_y", "bbox_width", "bbox_height")] == [0.1, 0.2, 0.2, 0.3]
    c = results[(0, 0)]
    assert first["label_1"] == CLASS_NAMES[c.indices[0]] and first["prob_1"] == round(c.probs[0], 6)
    assert first["species"] == taxonomy.taxon(c.top).species and first["genus"] == taxonomy.taxon(c.top).genus
    assert first["rollup_name"] == c.rollup.name
    out = tmp_path / f"detections{suffix}"
    with writers.open_writer(out, columns, chunk_size=2) as writer:  # chunked, as predict writes
        for frame in range(len(md.frames)):
            writer.write(detection_rows(md, results, taxonomy, root=tmp_path, k=3, rollup=True, frames=[frame]))
    back = writers.read_rows(out)
    assert [r["file"] for r in back] == [r["file"] for r in rows]
    assert [float(r["prob_1"]) for r in back] == [r["prob_1"] for r in rows]
    assert [int(r["detection"]) for r in back] == [0, 1, 0, 0, 1, 2, 0]
    assert list(back[0]) == columns


def test_image_summary(tmp_path):
    md, results, failures, taxonomy = classify_detections(make_camera_folder(tmp_path), tmp_path)
    times = capture_times([local_path(tmp_path, f.file) for f in md.frames])
    events = group_events([camera_of(f.file) for f in md.frames], times)
    rows = summary_rows(md, results, taxonomy, root=tmp_path, failures=failures, events=events)
    assert list(rows[0]) == summary_columns(md, events=True)
    assert [r["status"] for r in rows] == ["ok"] * 7 + ["failed", "failed"]
    assert [r["n_animal"] for r in rows] == [2, 1, 0, 3, 0, 0, 1, 0, 0]
    assert [r["n_person"] for r in rows][:2] == [0, 1] and rows[5]["n_vehicle"] == 1
    assert [r["blank"] for r in rows] == [False, False, True, False, True, False, False, None, None]
    assert [r["classified"] for r in rows] == [2, 1, 0, 3, 0, 0, 1, 0, 0]
    assert rows[7]["failure"] == failures[7] and rows[8]["failure"] == "image access failure"
    names = [answer(results[(3, d)], taxonomy).name for d in range(3)]
    counted = dict(part.split(":") for part in rows[3]["species"].split(";")) if rows[3]["species"] else {}
    assert sum(int(v) for v in counted.values()) + rows[3]["unidentified"] == 3
    assert set(counted) == {n for n in names if n}
    assert rows[0]["event_id"] == rows[2]["event_id"] != rows[3]["event_id"]
    out = tmp_path / "summary.parquet"
    writers.write_all(out, rows, summary_columns(md, events=True))
    assert writers.read_rows(out) == rows
