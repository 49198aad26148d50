"""Which classes a prior is fitted for, and how names from elsewhere map onto them.

A prior aligns to an image model's classes: `read_class_names` takes a model (registry name or checkpoint /
exported file, read through hierax.weights without building the network) or a plain class-list file (.txt:
one name per line; .json: a list of names or a {name: index} object). `match_names` and `match_keys` map
names onto those classes by the full name (the iNat21 directory name), else by the binomial
"Genus epithet" (so iNat21 categories also match models whose classes are plain binomials or whose numeric
prefixes differ), case-, space- and underscore-insensitively.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from hierax.data.taxonomy import Taxonomy, parse_class_name
from hierax.errors import HieraxError
from hierax.export.metadata import read_export_metadata
from hierax.weights.files import read_checkpoint
from hierax.weights.formats import is_exported
from hierax.weights.load import resolve_file

CLASS_LIST_SUFFIXES = (".txt", ".json")


def _read_class_list(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise HieraxError(f"cannot read the class list {path}: {err.strerror or err}") from None
    if path.suffix.lower() == ".txt":
        return [s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#")]
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise HieraxError(f"{path} is not valid JSON: {err}") from None
    if isinstance(doc, dict) and isinstance(doc.get("class_to_idx"), dict):
        doc = doc["class_to_idx"]
    if isinstance(doc, list) and all(isinstance(n, str) for n in doc):
        return list(doc)
    if isinstance(doc, dict) and all(isinstance(v, int) for v in doc.values()):
        names = [name for name, _ in sorted(doc.items(), key=lambda kv: kv[1])]
        if sorted(doc.values()) != list(range(len(doc))):
            raise HieraxError(f"{path}: class indices must run 0..{len(doc) - 1} without gaps")
        return names
    raise HieraxError(f"{path}: expected a JSON list of class names or an object of class name -> index")


def read_class_names(model: str | os.PathLike) -> list[str]:
    """The class names (index order) of a model name, a checkpoint or exported file, or a class-list file."""
    path = Path(model)
    if path.suffix.lower() in CLASS_LIST_SUFFIXES:
        if not path.is_file():
            raise HieraxError(f"no such class list: {path}")
        names = _read_class_list(path)
    else:
        file, _ = resolve_file(model)
        info = read_export_metadata(file)[0] if is_exported(file) else read_checkpoint(file)[1]
        names = info.class_names
    if not names:
        raise HieraxError(f"{model} has no classes")
    return names


def name_keys(name: str) -> list[str]:
    """Lookup keys of one class name: itself, then its binomial when it is an 8-part iNat21 name."""
    taxon = parse_class_name(name)
    return [name, taxon.species] if taxon else [name]


def match_keys(keys: Iterable[str | None], taxonomy: Taxonomy) -> int:
    """The first class of `taxonomy` that one of `keys` names (full name or binomial); -1 when none does.
    Digit-only keys are skipped (Taxonomy would read them as class indices)."""
    for key in keys:
        if key and not key.strip().isdigit():
            found = taxonomy.index_of(key)
            if found is not None:
                return found
    return -1


def match_names(source: Sequence[str], target: Sequence[str]) -> np.ndarray:
    """For each name of `source`: the index in `target` of the same class (name, else binomial), or -1."""
    taxonomy = Taxonomy(target)
    return np.array([match_keys(name_keys(n), taxonomy) for n in source], dtype=np.int64)
