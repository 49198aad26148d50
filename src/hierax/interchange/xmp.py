"""XMP sidecars that photo libraries (Lightroom, darktable, digiKam) read: species keywords and hierax's own fields,
written beside the photo, which is never touched.

API:
    sidecar_path(photo, style="auto") -> Path
        "append": IMG_0001.JPG.xmp (darktable, digiKam; unambiguous when IMG_0001.JPG and IMG_0001.CR2 sit side by
        side); "replace": IMG_0001.xmp (Lightroom's name for raw files); "auto": whichever of the two exists
        (append first), else append.
    update_xmp(existing, answers, *, model, run_time) -> bytes
        The XMP of an existing sidecar (bytes, or None for a new one) with hierax's keywords and fields replaced:
        - dc:subject gets each answer's scientific name and common name;
        - lr:hierarchicalSubject gets Kingdom|Phylum|Class|Order|Family|Genus|Genus species (down to the answer's
          rank for a roll-up);
        - hierax:Keywords / hierax:HierarchicalKeywords list the keywords hierax itself added (not those the
          photo already had), so that the next run removes exactly those and nothing a person typed;
        - hierax:Identifications (one entry per name: Name, Rank, CommonName, Probability, Count), hierax:Model and
          hierax:Date (the run's date and time).
        Everything else in the sidecar (ratings, labels, other keywords, develop settings) is kept. Unidentified
        answers (a roll-up that no rank passed) add no keyword.
    write_sidecar(photo, answers, *, model, run_time=None, style="auto") -> Path: update_xmp on the sidecar's
        current content, written atomically.
    SidecarWriter(taxonomy=None, *, model, run_time=None, style="auto"): the sidecars of a whole run, one run time
        for all. .write(photo, answers) and .write_rows(rows) (plain predict's rows, via answer_from_row) return
        the (photo, reason) of sidecars that could not be written (a read-only folder, a broken sidecar), for the
        errors file; they never raise SidecarError. .written and .failed count them.
Sidecars are parsed with the standard library's expat-based ElementTree, which never loads external entities;
documents with a DOCTYPE (which XMP never has, and which entity-expansion attacks need) are refused.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from hierax.atomic import atomic_write
from hierax.data.taxonomy import Taxonomy
from hierax.errors import HieraxError
from hierax.interchange.results import Answer, answer_from_row

NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "lr": "http://ns.adobe.com/lightroom/1.0/",
    "hierax": "urn:hierax:xmp:1.0#",
}
PACKET_BEGIN = "<?xpacket begin='\ufeff' id='W5M0MpCehiHzreSzNTczkc9d'?>\n"
PACKET_END = "\n<?xpacket end='w'?>\n"
STYLES = ("auto", "append", "replace")


class SidecarError(HieraxError):
    """An existing sidecar hierax cannot read; it is left as it is."""


def _q(prefix: str, name: str) -> str:
    return f"{{{NS[prefix]}}}{name}"


RDF_DESCRIPTION, RDF_ABOUT, RDF_BAG, RDF_LI = (_q("rdf", n) for n in ("Description", "about", "Bag", "li"))
CONTAINERS = (RDF_BAG, _q("rdf", "Seq"))  # keywords come in a Bag; some writers use a Seq


def sidecar_path(photo: str | os.PathLike, style: str = "auto") -> Path:
    """Where a photo's sidecar lives (see the module docstring)."""
    if style not in STYLES:
        raise HieraxError(f"unknown sidecar style '{style}': use {', '.join(STYLES)}")
    photo = Path(photo)
    append, replace = photo.with_name(photo.name + ".xmp"), photo.with_suffix(".xmp")
    if style == "append":
        return append
    if style == "replace":
        return replace
    return replace if replace.exists() and not append.exists() else append


def _parse(existing: bytes, source: str) -> ET.Element:
    """Parse sidecar bytes, registering their namespace prefixes so that they are written back unchanged."""
    if b"<!DOCTYPE" in existing or b"<!ENTITY" in existing:
        raise SidecarError(f"{source}: has a DOCTYPE or entity declarations, which XMP never uses; left untouched")
    try:
        for _, (prefix, uri) in ET.iterparse(io.BytesIO(existing), events=("start-ns",)):
            if prefix and not re.fullmatch(r"ns\d+", prefix):
                ET.register_namespace(prefix, uri)
        parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))
        parser.feed(existing)
        root = parser.close()
    except ET.ParseError as err:
        raise SidecarError(f"{source}: not readable XML ({err}); left untouched") from None
    return root


def _rdf(root: ET.Element, source: str) -> ET.Element:
    if root.tag == _q("rdf", "RDF"):
        return root
    rdf = root.find(_q("rdf", "RDF"))
    if rdf is None:
        raise SidecarError(f"{source}: no rdf:RDF element, so not an XMP sidecar; left untouched")
    return rdf


def _bag_values(prop: ET.Element | None) -> list[str]:
    return [li.text or "" for li in prop.iter(RDF_LI)] if prop is not None else []


def _remove_hierax(rdf: ET.Element) -> tuple[set[str], set[str]]:
    """Drop hierax's fields everywhere; return the keywords and hierarchical keywords its last run added."""
    keywords: set[str] = set()
    hierarchical: set[str] = set()
    for desc in rdf.iter(RDF_DESCRIPTION):
        keywords.update(_bag_values(desc.find(_q("hierax", "Keywords"))))
        hierarchical.update(_bag_values(desc.find(_q("hierax", "HierarchicalKeywords"))))
        for child in [c for c in desc if isinstance(c.tag, str) and c.tag.startswith(f"{{{NS['hierax']}}}")]:
            desc.remove(child)
        for attr in [a for a in desc.attrib if a.startswith(f"{{{NS['hierax']}}}")]:
            del desc.attrib[attr]
    return keywords, hierarchical


def _bag(desc_list: list[ET.Element], rdf: ET.Element, about: str, prop: str) -> ET.Element:
    """The rdf:Bag of property `prop` (e.g. dc:subject), created in a new Description when missing."""
    for desc in desc_list:
        found = desc.find(prop)
        if found is not None:
            bag = next((c for c in found if c.tag in CONTAINERS), None)
            return bag if bag is not None else ET.SubElement(found, RDF_BAG)
    desc = ET.SubElement(rdf, RDF_DESCRIPTION, {RDF_ABOUT: about})
    desc_list.append(desc)
    return ET.SubElement(ET.SubElement(desc, prop), RDF_BAG)


def _replace_keywords(rdf: ET.Element, about: str, prop: str, old: set[str], new: list[str]) -> list[str]:
    """Remove hierax's `old` keywords from `prop`'s bag and add `new` ones; the ones added (not already there)."""
    descriptions = list(rdf.iter(RDF_DESCRIPTION))
    existing = [d.find(prop) for d in descriptions if d.find(prop) is not None]
    for element in existing:
        for bag in (c for c in element if c.tag in CONTAINERS):
            for li in [li for li in bag if li.tag == RDF_LI and (li.text or "") in old]:
                bag.remove(li)
    if not new:
        return []
    bag = _bag(descriptions, rdf, about, prop)
    present = set(_bag_values(bag))
    added = [k for k in new if k not in present]
    for keyword in added:
        ET.SubElement(bag, RDF_LI).text = keyword
    return added


def _drop_empty(rdf: ET.Element) -> None:
    """Remove properties whose bag is now empty and Descriptions with nothing left in them."""
    for desc in list(rdf.iter(RDF_DESCRIPTION)):
        for prop in (_q("dc", "subject"), _q("lr", "hierarchicalSubject")):
            found = desc.find(prop)
            if found is not None and not _bag_values(found):
                desc.remove(found)
    for desc in [d for d in rdf if d.tag == RDF_DESCRIPTION]:
        if len(desc) == 0 and set(desc.attrib) <= {RDF_ABOUT}:
            rdf.remove(desc)


def _keywords(answers: Sequence[Answer]) -> tuple[list[str], list[str]]:
    subjects: dict[str, None] = {}
    hierarchical: dict[str, None] = {}
    for a in answers:
        if not a.identified:
            continue
        subjects[a.name] = None
        if a.common_name:
            subjects[a.common_name] = None
        hierarchical["|".join(a.lineage or (a.name,))] = None
    return list(subjects), list(hierarchical)


def _hierax_description(rdf: ET.Element, about: str, answers, keywords, hierarchical, model: str, when) -> None:
    desc = ET.SubElement(rdf, RDF_DESCRIPTION, {RDF_ABOUT: about})
    for name, values in (("Keywords", keywords), ("HierarchicalKeywords", hierarchical)):
        bag = ET.SubElement(ET.SubElement(desc, _q("hierax", name)), RDF_BAG)
        for value in values:
            ET.SubElement(bag, RDF_LI).text = value
    best: dict[str, tuple[Answer, int]] = {}
    for a in answers:
        if a.identified:
            seen = best.get(a.name)
            count = seen[1] + 1 if seen else 1
            best[a.name] = (a if seen is None or a.probability > seen[0].probability else seen[0], count)
    bag = ET.SubElement(ET.SubElement(desc, _q("hierax", "Identifications")), RDF_BAG)
    for a, count in best.values():
        item = ET.SubElement(bag, RDF_LI, {_q("rdf", "parseType"): "Resource"})
        fields = (("Name", a.name), ("Rank", a.rank), ("CommonName", a.common_name))
        fields += (("Probability", f"{a.probability:.4f}"), ("Count", str(count)))
        for field, value in fields:
            if value:
                ET.SubElement(item, _q("hierax", field)).text = value
    ET.SubElement(desc, _q("hierax", "Model")).text = model
    ET.SubElement(desc, _q("hierax", "Date")).text = when.isoformat(timespec="seconds")


def update_xmp(
    existing: bytes | None,
    answers: Sequence[Answer],
    *,
    model: str,
    run_time: dt.datetime | None = None,
    source: str = "<sidecar>",
) -> bytes:
    """A sidecar's XMP with hierax's keywords and fields replaced (see the module docstring)."""
    for prefix, uri in NS.items():
        ET.register_namespace(prefix, uri)
    if existing and existing.strip():
        root = _parse(existing, source)
    else:
        root = ET.Element(_q("x", "xmpmeta"), {_q("x", "xmptk"): "hierax"})
        ET.SubElement(root, _q("rdf", "RDF"))
    rdf = _rdf(root, source)
    first = next(rdf.iter(RDF_DESCRIPTION), None)
    about = first.get(RDF_ABOUT, "") if first is not None else ""
    old_keywords, old_hierarchical = _remove_hierax(rdf)
    subjects, hierarchical = _keywords(answers)
    added = _replace_keywords(rdf, about, _q("dc", "subject"), old_keywords, subjects)
    added_h = _replace_keywords(rdf, about, _q("lr", "hierarchicalSubject"), old_hierarchical, hierarchical)
    _drop_empty(rdf)
    when = run_time or dt.datetime.now().astimezone()
    _hierax_description(rdf, about, answers, added, added_h, model, when)
    ET.indent(root, space=" ")
    return (PACKET_BEGIN + ET.tostring(root, encoding="unicode") + PACKET_END).encode("utf-8")


def write_sidecar(
    photo: str | os.PathLike,
    answers: Sequence[Answer],
    *,
    model: str,
    run_time: dt.datetime | None = None,
    style: str = "auto",
) -> Path:
    """Write or update the photo's sidecar (the photo itself is never opened); returns the sidecar's path."""
    path = sidecar_path(photo, style)
    try:
        existing = path.read_bytes() if path.exists() else None
    except OSError as err:
        raise SidecarError(f"cannot read the sidecar {path}: {err.strerror or err}") from None
    data = update_xmp(existing, answers, model=model, run_time=run_time, source=str(path))
    try:
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    except OSError as err:
        raise SidecarError(f"cannot write the sidecar {path}: {err.strerror or err}") from None


class SidecarWriter:
    """Sidecars for every photo of a run (see the module docstring)."""

    def __init__(
        self,
        taxonomy: Taxonomy | None = None,
        *,
        model: str,
        run_time: dt.datetime | None = None,
        style: str = "auto",
    ) -> None:
        if style not in STYLES:
            raise HieraxError(f"unknown sidecar style '{style}': use {', '.join(STYLES)}")
        self.taxonomy = taxonomy
        self.model = model
        self.run_time = run_time or dt.datetime.now().astimezone()
        self.style = style
        self.written = self.failed = 0

    def write(self, photo: str | os.PathLike, answers: Sequence[Answer]) -> tuple[str, str] | None:
        """Write one photo's sidecar; (photo, reason) when it could not be."""
        try:
            write_sidecar(photo, answers, model=self.model, run_time=self.run_time, style=self.style)
        except SidecarError as err:
            self.failed += 1
            return os.fspath(photo), f"XMP sidecar not written: {err}"
        self.written += 1
        return None

    def write_rows(self, rows: Iterable[Mapping]) -> list[tuple[str, str]]:
        """One sidecar per row of plain predict's output (its `path`); the failures."""
        failures = (self.write(row["path"], [answer_from_row(row, self.taxonomy)]) for row in rows)
        return [f for f in failures if f is not None]
