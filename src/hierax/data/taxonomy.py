"""iNat21 taxonomy: parse class names, attach common names, roll probabilities up the ranks, species lists.

iNat21 class names are `NNNNN_Kingdom_Phylum_Class_Order_Family_Genus_epithet`. A `Taxonomy` built from a
model's class names (index order) answers:
- `taxon(i)`: the parsed lineage of class i (None for names that are not 8-part iNat21 names);
- `rollup(probs, thresholds)`: sums species probabilities per genus, family, ... and reports the deepest rank
  whose best group passes its threshold (defaults: species 0.8, genus 0.6, family 0.4), e.g.
  `Rollup(rank="genus", name="Quercus", probability=0.91)` when no single oak species is sure;
- `restrict(probs, allowed)`: zero every class outside a species list and renormalise over the rest.
Common names come from `load_common_names` (a JSON object index -> name, or an iNat21 annotation JSON).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from hierax.errors import HieraxError

logger = logging.getLogger(__name__)

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
DEFAULT_THRESHOLDS: dict[str, float] = {"species": 0.8, "genus": 0.6, "family": 0.4}
_INAT_NAME = re.compile(r"^(\d+)_([^_]+)_([^_]+)_([^_]+)_([^_]+)_([^_]+)_([^_]+)_(.+)$")


def _key(text: str) -> str:
    """Case-, space- and underscore-insensitive lookup key."""
    return " ".join(text.replace("_", " ").split()).lower()


@dataclass(frozen=True)
class Taxon:
    """One iNat21 class: its numeric id and names from kingdom down to the specific epithet."""

    id: int
    kingdom: str
    phylum: str
    class_: str
    order: str
    family: str
    genus: str
    epithet: str

    @property
    def species(self) -> str:
        """The binomial, e.g. 'Corvus corax'."""
        return f"{self.genus} {self.epithet}"

    def at(self, rank: str) -> str:
        """The name at `rank` (species gives the binomial)."""
        if rank == "species":
            return self.species
        return getattr(self, "class_" if rank == "class" else rank)

    def lineage(self, rank: str) -> tuple[str, ...]:
        """Names from kingdom down to `rank`: a group key that keeps homonyms in different kingdoms apart."""
        parts = (self.kingdom, self.phylum, self.class_, self.order, self.family, self.genus, self.epithet)
        return parts[: RANKS.index(rank) + 1]

    def as_dict(self) -> dict[str, str]:
        """kingdom ... species as a dict of rank -> name."""
        return {rank: self.at(rank) for rank in RANKS}


def parse_class_name(name: str) -> Taxon | None:
    """Parse an 8-part iNat21 class name; None when the name does not have that form."""
    match = _INAT_NAME.match(name)
    if match is None:
        return None
    number, *names = match.groups()
    return Taxon(int(number), *names)


@dataclass(frozen=True)
class Rollup:
    """The deepest rank whose summed probability passes its threshold; rank and name are '' when none does."""

    rank: str
    name: str
    probability: float
    common_name: str = ""


def load_common_names(path: str | os.PathLike, class_names: Sequence[str]) -> dict[int, str]:
    """Class index -> common name from a JSON object {"index": name} or an iNat21 annotation JSON's categories."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise HieraxError(f"cannot read common names from {path}: {err}") from None
    if isinstance(doc, dict) and "categories" in doc:
        index_of = {name: i for i, name in enumerate(class_names)}
        names: dict[int, str] = {}
        for cat in doc["categories"]:
            key = cat.get("image_dir_name") or cat.get("name")
            if cat.get("common_name") and key in index_of:
                names[index_of[key]] = cat["common_name"]
        return names
    if isinstance(doc, dict):
        try:
            return {int(k): str(v) for k, v in doc.items() if v}
        except ValueError:
            pass
    raise HieraxError(f"{path}: expected a JSON object of class index -> common name, or an iNat21 annotation file")


class Taxonomy:
    """Taxonomic view of a model's classes (index order), with optional common names (index -> name)."""

    def __init__(self, class_names: Sequence[str], common_names: Mapping[int, str] | None = None) -> None:
        self.class_names = list(class_names)
        self.common_names = dict(common_names or {})
        self.taxa = [parse_class_name(n) for n in self.class_names]
        self.is_taxonomic = bool(self.taxa) and all(t is not None for t in self.taxa)

    def __len__(self) -> int:
        return len(self.class_names)

    def taxon(self, index: int) -> Taxon | None:
        return self.taxa[index]

    def common_name(self, index: int) -> str:
        return self.common_names.get(index, "")

    def _require_taxonomic(self) -> None:
        if not self.is_taxonomic:
            raise HieraxError("taxonomic roll-up needs iNat21-style class names (NNNNN_Kingdom_..._Genus_epithet)")

    @cached_property
    def _groups(self) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
        """Per rank: class order sorted by group, group start offsets, and group display names."""
        self._require_taxonomic()
        groups = {}
        for rank in RANKS:
            keys = [t.lineage(rank) for t in self.taxa]  # type: ignore[union-attr]
            order = np.array(sorted(range(len(keys)), key=lambda i: keys[i]), dtype=np.int64)
            starts = [0] + [j for j in range(1, len(order)) if keys[order[j]] != keys[order[j - 1]]]
            names = [self.taxa[order[s]].at(rank) for s in starts]  # type: ignore[union-attr]
            groups[rank] = (order, np.array(starts, dtype=np.int64), names)
        return groups

    def rank_sums(self, probs: np.ndarray, rank: str) -> tuple[np.ndarray, list[str]]:
        """Probabilities summed per group at `rank`: ((B, G) or (G,), group names)."""
        order, starts, names = self._groups[rank]
        sums = np.add.reduceat(np.asarray(probs, dtype=np.float64)[..., order], starts, axis=-1)
        return sums, names

    def group_of(self, rank: str) -> np.ndarray:
        """Group id at `rank` of every class (index order), matching the names of rank_sums."""
        order, starts, _ = self._groups[rank]
        ids = np.empty(len(order), dtype=np.int64)
        ids[order] = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(order))))
        return ids

    def check_rollup(self, thresholds: Mapping[str, float] | None = None) -> dict[str, float]:
        """The thresholds to use (defaults when None); HieraxError for unknown ranks or non-iNat21 classes."""
        self._require_taxonomic()
        thresholds = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
        unknown = set(thresholds) - set(RANKS)
        if unknown:
            raise HieraxError(f"unknown rank(s) {sorted(unknown)}; ranks are {', '.join(RANKS)}")
        return thresholds

    def rollup(self, probs: np.ndarray, thresholds: Mapping[str, float] | None = None) -> list[Rollup]:
        """For each row of probs (C,) or (B, C): the deepest rank whose best summed probability passes."""
        thresholds = self.check_rollup(thresholds)
        batch = np.atleast_2d(probs)
        results: list[Rollup | None] = [None] * len(batch)
        for rank in sorted(thresholds, key=RANKS.index, reverse=True):
            sums, names = self.rank_sums(batch, rank)
            best = sums.argmax(axis=1)
            for row, group in enumerate(best):
                p = float(sums[row, group])
                if results[row] is None and p >= thresholds[rank]:
                    order, starts, _ = self._groups[rank]
                    common = self.common_name(int(order[starts[group]])) if rank == "species" else ""
                    results[row] = Rollup(rank, names[group], p, common)
        return [r if r is not None else Rollup("", "", 0.0) for r in results]

    @cached_property
    def _lookup(self) -> dict[str, int]:
        by_key: dict[str, int] = {}
        for i, name in enumerate(self.class_names):
            by_key[_key(name)] = i
            if self.taxa[i] is not None:
                by_key.setdefault(_key(self.taxa[i].species), i)  # type: ignore[union-attr]
        for i, common in self.common_names.items():
            by_key.setdefault(_key(common), i)
        return by_key

    def index_of(self, name: str) -> int | None:
        """The class index a name refers to: full class name, binomial ('Corvus corax' or 'Corvus_corax'),
        common name, or numeric index; None when nothing matches."""
        found = self._lookup.get(_key(name))
        if found is None and name.strip().isdigit() and int(name) < len(self.class_names):
            found = int(name)
        return found

    def resolve_species_list(self, entries: Iterable[str]) -> np.ndarray:
        """Class indices named by entries (see index_of). Unknown entries are logged; none matching raises."""
        found: list[int] = []
        missing: list[str] = []
        for entry in entries:
            index = self.index_of(entry)
            if index is None:
                missing.append(entry)
            else:
                found.append(index)
        if missing:
            logger.warning("%d species-list entries match no class: %s", len(missing), ", ".join(missing[:10]))
        if not found:
            raise HieraxError("no entry of the species list matches a class of the model")
        return np.unique(np.array(found, dtype=np.int64))

    def read_species_list(self, path: str | os.PathLike) -> np.ndarray:
        """Class indices from a species-list file: one entry per line (first CSV field), '#' comments."""
        try:
            with open(path, encoding="utf-8-sig") as fh:
                lines = [line.split(",")[0].strip() for line in fh]
        except OSError as err:
            raise HieraxError(f"cannot read the species list {path}: {err.strerror or err}") from None
        return self.resolve_species_list([e for e in lines if e and not e.startswith("#")])


def rollup(
    probs: np.ndarray,
    class_names: Sequence[str],
    thresholds: Mapping[str, float] | None = None,
    common_names: Mapping[int, str] | None = None,
) -> list[Rollup]:
    """Roll class probabilities (C,) or (B, C) up the iNat21 taxonomy: one Rollup per row (see Taxonomy.rollup).
    Build a Taxonomy once instead when calling this for many batches."""
    return Taxonomy(class_names, common_names).rollup(probs, thresholds)


def restrict(probs: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Zero the probabilities of classes outside `allowed` and renormalise each row over the allowed ones."""
    probs = np.atleast_2d(np.asarray(probs, dtype=np.float32))
    out = np.zeros_like(probs)
    kept = probs[:, allowed]
    total = kept.sum(axis=1, keepdims=True)
    out[:, allowed] = np.where(total > 0, kept / np.where(total > 0, total, 1.0), 1.0 / len(allowed))
    return out


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and probabilities of the k most probable classes per row, best first."""
    probs = np.atleast_2d(probs)
    k = min(k, probs.shape[1])
    idx = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(probs, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(vals, order, axis=1)
