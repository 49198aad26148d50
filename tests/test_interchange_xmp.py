"""XMP sidecars read back with exiftool, as Lightroom and digiKam read them: keywords added, everything else kept,
a second run replacing only hierax's own keywords, the photo never touched."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest

from hierax.data.taxonomy import Taxonomy
from hierax.interchange.results import Answer, answer, classify
from hierax.interchange.xmp import SidecarError, sidecar_path, update_xmp, write_sidecar

from .interchange_support import CLASS_NAMES, COMMON

EXIFTOOL = shutil.which("exiftool")
pytestmark = pytest.mark.skipif(EXIFTOOL is None, reason="exiftool (libimage-exiftool-perl) is not installed")
WHEN = dt.datetime(2024, 6, 1, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
LIGHTROOM = """<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="Adobe XMP Core 7.0-c000">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:crs="http://ns.adobe.com/camera-raw-settings/1.0/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
   xmp:Rating="3"
   xmp:Label="Red"
   crs:Exposure2012="+0.35">
   <dc:subject>
    <rdf:Bag>
     <rdf:li>trip 2024</rdf:li>
    </rdf:Bag>
   </dc:subject>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def _exif(path) -> dict:
    out = subprocess.run(
        [EXIFTOOL, "-j", "-G1", "-struct", "-XMP:all", str(path)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)[0]


def _list(value) -> list:
    return value if isinstance(value, list) else [value]


def _photo(tmp_path, name="IMG_0001.JPG"):
    photo = tmp_path / name
    photo.write_bytes(b"\xff\xd8 pretend JPEG bytes \xff\xd9")
    return photo, hashlib.sha256(photo.read_bytes()).hexdigest()


def _answers():
    taxonomy = Taxonomy(CLASS_NAMES, COMMON)
    probs = np.array([[0.9, 0.05, 0.02, 0.01, 0.01, 0.01], [0.3, 0.4, 0.1, 0.1, 0.05, 0.05]])
    fox, unsure = classify(probs, taxonomy, k=3, rollup=True)
    return answer(fox, taxonomy), answer(unsure, taxonomy)


def test_new_sidecar_has_keywords_and_hierax_fields(tmp_path):
    photo, digest = _photo(tmp_path)
    fox, vulpes = _answers()
    assert (fox.name, fox.rank, vulpes.name, vulpes.rank) == ("Vulpes vulpes", "species", "Vulpes", "genus")
    path = write_sidecar(photo, [fox, vulpes, fox], model="hieradet_d_small_inat21", run_time=WHEN)
    assert path == tmp_path / "IMG_0001.JPG.xmp"
    tags = _exif(path)
    assert _list(tags["XMP-dc:Subject"]) == ["Vulpes vulpes", "red fox", "Vulpes"]
    assert _list(tags["XMP-lr:HierarchicalSubject"]) == [
        "Animalia|Chordata|Mammalia|Carnivora|Canidae|Vulpes|Vulpes vulpes",
        "Animalia|Chordata|Mammalia|Carnivora|Canidae|Vulpes",
    ]
    assert tags["XMP-hierax:Model"] == "hieradet_d_small_inat21"
    assert tags["XMP-hierax:Date"] == "2024:06:01 12:30:00+02:00"
    found = tags["XMP-hierax:Identifications"]
    assert [(i["Name"], i["Rank"], i["Count"]) for i in found] == [
        ("Vulpes vulpes", "species", 2),
        ("Vulpes", "genus", 1),
    ]
    assert found[0]["CommonName"] == "red fox" and "CommonName" not in found[1]
    assert float(found[0]["Probability"]) == pytest.approx(fox.probability, abs=1e-4)
    assert hashlib.sha256(photo.read_bytes()).hexdigest() == digest


def test_existing_sidecar_keeps_its_content_and_a_second_run_replaces_only_hierax_keywords(tmp_path):
    photo, digest = _photo(tmp_path)
    sidecar = sidecar_path(photo)
    subprocess.run(
        [EXIFTOOL, "-q", "-XMP-dc:Subject=holiday", "-XMP-dc:Subject=red fox", "-XMP-xmp:Rating=4",
         "-XMP-lr:HierarchicalSubject=Places|Home", "-XMP-dc:Title=Dawn at the pond", str(sidecar)],
        check=True,
    )  # fmt: skip
    fox, _ = _answers()
    write_sidecar(photo, [fox], model="m1", run_time=WHEN)
    tags = _exif(sidecar)
    assert _list(tags["XMP-dc:Subject"]) == ["holiday", "red fox", "Vulpes vulpes"]
    assert _list(tags["XMP-lr:HierarchicalSubject"])[0] == "Places|Home"
    assert tags["XMP-xmp:Rating"] == 4 and tags["XMP-dc:Title"] == "Dawn at the pond"
    assert _list(tags["XMP-hierax:Keywords"]) == ["Vulpes vulpes"]  # "red fox" was the user's already
    cat = Answer("Felis catus", "species", 0.7, "domestic cat", ("Animalia", "Chordata", "Mammalia", "Carnivora",
                                                                   "Felidae", "Felis", "Felis catus"))  # fmt: skip
    write_sidecar(photo, [cat], model="m2", run_time=WHEN + dt.timedelta(days=1))
    tags = _exif(sidecar)
    assert _list(tags["XMP-dc:Subject"]) == ["holiday", "red fox", "Felis catus", "domestic cat"]
    assert _list(tags["XMP-lr:HierarchicalSubject"]) == [
        "Places|Home",
        "Animalia|Chordata|Mammalia|Carnivora|Felidae|Felis|Felis catus",
    ]
    assert tags["XMP-xmp:Rating"] == 4 and tags["XMP-hierax:Model"] == "m2"
    assert [i["Name"] for i in tags["XMP-hierax:Identifications"]] == ["Felis catus"]
    assert tags["XMP-hierax:Date"].startswith("2024:06:02")
    # A run that finds nothing removes hierax's keywords and leaves the user's.
    write_sidecar(photo, [], model="m3", run_time=WHEN)
    tags = _exif(sidecar)
    assert _list(tags["XMP-dc:Subject"]) == ["holiday", "red fox"]
    assert _list(tags["XMP-lr:HierarchicalSubject"]) == ["Places|Home"]
    assert hashlib.sha256(photo.read_bytes()).hexdigest() == digest


def test_lightroom_sidecar_with_attributes_and_its_naming(tmp_path):
    photo, _ = _photo(tmp_path, "DSC_0042.NEF")
    lightroom = tmp_path / "DSC_0042.xmp"
    lightroom.write_text(LIGHTROOM, encoding="utf-8")
    assert sidecar_path(photo) == lightroom and sidecar_path(photo, "append") == tmp_path / "DSC_0042.NEF.xmp"
    fox, _ = _answers()
    assert write_sidecar(photo, [fox], model="m", run_time=WHEN) == lightroom
    tags = _exif(lightroom)
    assert tags["XMP-xmp:Rating"] == 3 and tags["XMP-xmp:Label"] == "Red"
    assert float(tags["XMP-crs:Exposure2012"]) == pytest.approx(0.35)
    assert _list(tags["XMP-dc:Subject"]) == ["trip 2024", "Vulpes vulpes", "red fox"]
    assert "crs:Exposure2012" in lightroom.read_text(encoding="utf-8")  # its prefixes are kept
    assert not (tmp_path / "DSC_0042.NEF.xmp").exists()
    # Keywords some writers keep in an rdf:Seq are extended there, not in a second container.
    seq = LIGHTROOM.replace("rdf:Bag", "rdf:Seq")
    lightroom.write_text(seq, encoding="utf-8")
    write_sidecar(photo, [fox], model="m", run_time=WHEN)
    assert _list(_exif(lightroom)["XMP-dc:Subject"]) == ["trip 2024", "Vulpes vulpes", "red fox"]
    assert lightroom.read_text(encoding="utf-8").count("<rdf:Seq>") == 1


def test_unidentified_adds_no_keyword_and_bad_sidecars_are_left_alone(tmp_path):
    photo, _ = _photo(tmp_path)
    data = update_xmp(None, [Answer("", "", 0.3)], model="m", run_time=WHEN)
    path = sidecar_path(photo)
    path.write_bytes(data)
    tags = _exif(path)
    assert "XMP-dc:Subject" not in tags and tags["XMP-hierax:Model"] == "m"
    bomb = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x:xmpmeta xmlns:x="adobe:ns:meta/">&a;</x:xmpmeta>'
    for bad in (bomb, b"<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF", b"<html><body>not xmp</body></html>"):
        path.write_bytes(bad)
        with pytest.raises(SidecarError, match="left untouched"):
            write_sidecar(photo, [Answer("Vulpes vulpes", "species", 0.9)], model="m")
        assert path.read_bytes() == bad
