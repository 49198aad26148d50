"""`hierax predict PHOTOS --xmp` through the real command: sidecars read back with exiftool as Lightroom and
digiKam read them, their other content kept, a second run replacing only hierax's keywords, the photos never
touched, and sidecars that cannot be written listed in the errors file without stopping the run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image
from skimage import data as skdata

from hierax.cli import main
from hierax.data.taxonomy import RANKS
from hierax.inference import writers
from tests.data_fixtures import CLASS_NAMES, COMMON_NAMES, make_checkpoint

EXIFTOOL = shutil.which("exiftool")
pytestmark = pytest.mark.skipif(EXIFTOOL is None, reason="exiftool (libimage-exiftool-perl) is not installed")
LIGHTROOM = """<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="Adobe XMP Core 7.0-c000">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/"
   xmp:Rating="3" xmp:Label="Red">
   <dc:subject><rdf:Bag><rdf:li>trip 2024</rdf:li></rdf:Bag></dc:subject>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def _tags(path) -> dict:
    out = subprocess.run([EXIFTOOL, "-j", "-G1", "-XMP:all", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]


def _list(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def photos(tmp_path):
    """Three real photos: a.jpg with a Lightroom sidecar (a.xmp), b.jpg with none, c.jpg with a broken one."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, image in (("a", skdata.chelsea()), ("b", skdata.coffee()), ("c", skdata.astronaut())):
        Image.fromarray(image).resize((96, 80)).save(folder / f"{name}.jpg", quality=90)
    (folder / "a.xmp").write_text(LIGHTROOM)
    (folder / "c.jpg.xmp").write_text("<x:xmpmeta broken")
    names = tmp_path / "names.json"
    names.write_text(json.dumps({str(i): n for i, n in enumerate(COMMON_NAMES)}))
    return folder, names, make_checkpoint(tmp_path / "tiny.pt", size=64)


def test_sidecars_through_the_command(photos, tmp_path, capsys):
    folder, names, checkpoint = photos
    before = {p.name: _digest(p) for p in folder.glob("*.jpg")}
    out = tmp_path / "out.csv"
    env = {**os.environ, "HIERAX_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "hierax", "predict", str(folder), "--model", str(checkpoint), "--xmp"]
    command += ["-o", str(out), "--common-names", str(names), "--workers", "0", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "3 ok, 0 failed" in result.stderr and "XMP sidecars could not be written" in result.stderr
    rows = {os.path.basename(r["path"]): r for r in writers.read_rows(out)}

    # The Lightroom sidecar keeps its rating, label and keyword, and gains the species and its lineage.
    a, answer = _tags(folder / "a.xmp"), rows["a.jpg"]
    assert (a["XMP-xmp:Rating"], a["XMP-xmp:Label"]) == (3, "Red")
    assert sorted(_list(a["XMP-dc:Subject"])) == sorted(["trip 2024", answer["species"], answer["common_name"]])
    assert _list(a["XMP-lr:HierarchicalSubject"]) == ["|".join(answer[r] for r in RANKS)]
    assert a["XMP-hierax:Model"] == "tiny.pt" and a["XMP-hierax:IdentificationsName"] == answer["species"]
    assert not (folder / "a.jpg.xmp").exists()  # Lightroom's name was used, no second sidecar
    b = _tags(folder / "b.jpg.xmp")
    assert _list(b["XMP-dc:Subject"]) == [rows["b.jpg"]["species"], rows["b.jpg"]["common_name"]]
    # The broken sidecar is left as it was and named in the errors file; the photos are untouched.
    assert (folder / "c.jpg.xmp").read_text() == "<x:xmpmeta broken"
    errors = dict(writers.read_errors(tmp_path / "out.errors.csv"))
    assert list(errors) == [str(folder / "c.jpg")] and "not readable XML" in errors[str(folder / "c.jpg")]
    assert {p.name: _digest(p) for p in folder.glob("*.jpg")} == before

    # A second run with another answer replaces hierax's keywords only.
    other = next(n for n in CLASS_NAMES if answer["species"] != " ".join(n.split("_")[-2:]))
    species_list = tmp_path / "species.txt"
    species_list.write_text(other + "\n")
    code = main(
        ["predict", str(folder), "--model", str(checkpoint), "--xmp", "--species-list", str(species_list)]
        + ["--common-names", str(names), "--rollup", "--workers", "0", "--quiet"]
    )
    assert code == 0, capsys.readouterr().err
    binomial, common = " ".join(other.split("_")[-2:]), COMMON_NAMES[CLASS_NAMES.index(other)]
    a = _tags(folder / "a.xmp")
    assert sorted(_list(a["XMP-dc:Subject"])) == sorted(["trip 2024", binomial, common])
    assert _list(a["XMP-lr:HierarchicalSubject"]) == ["|".join(other.split("_")[1:-1] + [binomial])]
    assert a["XMP-xmp:Rating"] == 3 and _list(a["XMP-hierax:Keywords"]) == [binomial, common]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_goes_to_the_errors_file(photos, tmp_path, capsys):
    folder, _, checkpoint = photos
    folder.chmod(0o555)
    try:
        code = main(["predict", str(folder), "--model", str(checkpoint), "--xmp", "-o", str(tmp_path / "o.csv")])
    finally:
        folder.chmod(0o755)
    assert code == 0, capsys.readouterr().err
    assert len(writers.read_rows(tmp_path / "o.csv")) == 3
    assert len(writers.read_errors(tmp_path / "o.errors.csv")) == 3
