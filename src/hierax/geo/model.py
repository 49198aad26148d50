"""The presence network and the fitted prior: `PresenceNet` (a residual MLP, one presence logit per species),
`GeoPrior` (the network with the class names it aligns to: presence queries, prior files) and `combine`.

A prior file is safetensors: the network's tensors plus `columns` (the model class index of each output), and
metadata strings: `format` ("hierax-geoprior"), `format_version`, `hierax_version`, `class_names` (JSON list:
the image model's classes in index order), `encoding` (JSON: name and whether the date is an input),
`hyperparameters`, `fit_summary`, `source_model` and optionally `common_names` (JSON {index: name}).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hierax.atomic import atomic_write
from hierax.errors import CheckpointError, HieraxError
from hierax.geo.classes import match_names
from hierax.geo.encoding import ENCODING, MID_MONTHS, day_fractions, encode, num_features

FORMAT = "hierax-geoprior"
FORMAT_VERSION = "1"
DEFAULT_FLOOR = 0.05


class _Residual(nn.Module):
    """h + relu(fc2(dropout(relu(fc1(h))))): a two-layer residual block of constant width."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + F.relu(self.fc2(self.dropout(F.relu(self.fc1(h)))))


class PresenceNet(nn.Module):
    """Encoded (lon, lat[, day]) -> one presence logit per species: a linear stem, `blocks` residual blocks of
    `hidden` units and a linear head. `features` is the shared representation the head reads."""

    def __init__(self, in_features: int, num_outputs: int, hidden: int = 256, blocks: int = 4, dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Linear(in_features, hidden)
        self.blocks = nn.Sequential(*[_Residual(hidden, dropout) for _ in range(blocks)])
        self.head = nn.Linear(hidden, num_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(F.relu(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class GeoPrior:
    """A fitted presence model aligned to an image model's classes.

    `class_names`: the image model's classes in index order; `columns[k]`: the class index of network output
    `k` (classes without any training record have no output and get presence 1.0, i.e. no re-weighting)."""

    net: PresenceNet
    class_names: list[str]
    columns: np.ndarray
    uses_date: bool
    hyperparameters: dict = field(default_factory=dict)
    fit_summary: dict = field(default_factory=dict)
    source_model: str = ""
    common_names: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.columns = np.asarray(self.columns, dtype=np.int64)
        if len(self.columns) != self.net.head.out_features:
            raise CheckpointError(f"the prior has {self.net.head.out_features} outputs but {len(self.columns)} columns")
        if len(self.columns) and not (self.columns.min() >= 0 and self.columns.max() < len(self.class_names)):
            raise CheckpointError("the prior's columns point outside its class list")
        self.net.eval().requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def output_of(self) -> np.ndarray:
        """For each class index: the network output that predicts it, or -1."""
        out = np.full(self.num_classes, -1, dtype=np.int64)
        out[self.columns] = np.arange(len(self.columns))
        return out

    def presence(
        self,
        lat: Any,
        lon: Any,
        date: Any = None,
        *,
        classes: Sequence[int] | np.ndarray | None = None,
        batch_size: int = 4096,
    ) -> np.ndarray:
        """Presence probabilities (N, C) at N locations (degrees; scalars or sequences). `date`: None, one date
        for every row, or one per row (None entries allowed). A prior that uses the date answers an undated row
        with its highest presence over the year (the middle of each month): "is it here at some time". Classes
        the prior has no records of get 1.0. `classes` limits the columns (e.g. one species for a map)."""
        lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))
        lon = np.atleast_1d(np.asarray(lon, dtype=np.float64))
        lat, lon = np.broadcast_arrays(lat, lon)
        bad = ~(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise HieraxError(f"location {i} ({lat[i]}, {lon[i]}) is not a latitude/longitude in degrees")
        wanted = np.arange(self.num_classes) if classes is None else np.asarray(classes, dtype=np.int64)
        source = self.output_of()[wanted]
        result = np.ones((len(lat), len(wanted)), dtype=np.float32)
        known = np.flatnonzero(source >= 0)
        if len(lat) == 0 or len(known) == 0:
            return result
        head = self.net.head
        weight, bias = head.weight[source[known]], head.bias[source[known]]
        days = day_fractions(date, len(lat)) if self.uses_date else None
        for start in range(0, len(lat), batch_size):
            rows = slice(start, start + batch_size)
            logits = self._logits(lat[rows], lon[rows], None if days is None else days[rows], weight, bias)
            result[rows, known] = torch.sigmoid(logits).numpy()
        return result

    @torch.no_grad()
    def _logits(
        self, lat: np.ndarray, lon: np.ndarray, days: np.ndarray | None, weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        lat_t, lon_t = torch.from_numpy(lat).float(), torch.from_numpy(lon).float()
        if days is None:
            return F.linear(self.net.features(encode(lat_t, lon_t)), weight, bias)
        undated = np.isnan(days)
        days = np.where(undated, 0.0, days)
        logits = F.linear(self.net.features(encode(lat_t, lon_t, torch.from_numpy(days).float())), weight, bias)
        if undated.any():
            idx = torch.from_numpy(np.flatnonzero(undated))
            n, months = len(idx), torch.tensor(MID_MONTHS, dtype=torch.float32)
            x = encode(lat_t[idx].repeat_interleave(12), lon_t[idx].repeat_interleave(12), months.repeat(n))
            yearly = F.linear(self.net.features(x), weight, bias).view(n, 12, -1)
            logits[idx] = yearly.max(dim=1).values
        return logits

    def for_classes(self, class_names: Sequence[str]) -> GeoPrior:
        """This prior re-aligned to another model's classes (same list: itself). Classes are matched by full
        name, else by binomial; classes of the new list it has no records of get presence 1.0. HieraxError
        when no class matches."""
        class_names = list(class_names)
        if class_names == self.class_names:
            return self
        mapped = match_names(self.class_names, class_names)[self.columns]
        keep = np.flatnonzero(mapped >= 0)
        if len(keep) == 0:
            raise HieraxError(
                "the geo prior shares no class with this model: fit one for it with `hierax geoprior fit ... "
                "--model MODEL`"
            )
        net = PresenceNet(self.net.stem.in_features, len(keep), self.net.stem.out_features, len(self.net.blocks))
        state = {k: v for k, v in self.net.state_dict().items() if not k.startswith("head.")}
        state["head.weight"], state["head.bias"] = self.net.head.weight[keep], self.net.head.bias[keep]
        net.load_state_dict(state)
        common = {
            int(mapped[k]): self.common_names[c]
            for k, c in enumerate(self.columns)
            if c in self.common_names and mapped[k] >= 0
        }
        return GeoPrior(
            net,
            class_names,
            mapped[keep],
            self.uses_date,
            self.hyperparameters,
            self.fit_summary,
            self.source_model,
            common,
        )

    def metadata(self) -> dict[str, str]:
        """The metadata strings of a prior file."""
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "hierax_version": package_version("hierax"),
            "class_names": json.dumps(self.class_names),
            "encoding": json.dumps({"name": ENCODING, "date": self.uses_date}),
            "hyperparameters": json.dumps(self.hyperparameters),
            "fit_summary": json.dumps(self.fit_summary),
            "source_model": self.source_model,
        }
        if self.common_names:
            meta["common_names"] = json.dumps({str(k): v for k, v in self.common_names.items()})
        return meta

    def save(self, path: str | Path) -> Path:
        """Write the prior atomically as safetensors with its metadata inside."""
        from safetensors.torch import save_file

        tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        tensors["columns"] = torch.from_numpy(self.columns.copy())
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=self.metadata()))


def _json_field(meta: dict[str, str], key: str, path: Path, default: Any = None) -> Any:
    if key not in meta:
        if default is not None:
            return default
        raise CheckpointError(f"{path} is not a hierax geo prior: its metadata has no '{key}'")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: metadata field '{key}' is not valid JSON") from None


def load_prior(path: str | Path) -> GeoPrior:
    """Read a prior file written by `GeoPrior.save` (`hierax geoprior fit`); CheckpointError when it is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"geo prior not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a hierax geo prior (format '{meta.get('format', 'none')}')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is a geo prior of format version {meta.get('format_version')}; this hierax reads version "
            f"{FORMAT_VERSION}: upgrade hierax or fit the prior again"
        )
    encoding = _json_field(meta, "encoding", path)
    if encoding.get("name") != ENCODING:
        raise CheckpointError(f"{path} uses the input encoding '{encoding.get('name')}', not {ENCODING}")
    hyper = _json_field(meta, "hyperparameters", path)
    state = {k[len("net.") :]: v for k, v in tensors.items() if k.startswith("net.")}
    if "columns" not in tensors or "head.weight" not in state:
        raise CheckpointError(f"{path} is incomplete: no 'columns' or network head")
    blocks = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    net = PresenceNet(
        num_features(bool(encoding.get("date"))),
        int(state["head.weight"].shape[0]),
        int(state["stem.weight"].shape[0]),
        blocks,
    )
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the network does not fit its metadata ({str(err).splitlines()[0]})") from None
    common = _json_field(meta, "common_names", path, default={})
    return GeoPrior(
        net,
        list(_json_field(meta, "class_names", path)),
        tensors["columns"].numpy(),
        bool(encoding.get("date")),
        hyper,
        _json_field(meta, "fit_summary", path, default={}),
        meta.get("source_model", ""),
        {int(k): str(v) for k, v in common.items()},
    )


def combine(probs: Any, presence: Any, floor: float = DEFAULT_FLOOR) -> np.ndarray:
    """Image probabilities re-weighted by presence and renormalised, per row of (C,) or (N, C):

        combined_i = p_i * max(presence_i, floor) / sum_j p_j * max(presence_j, floor)

    The floor bounds the discount of a species the prior has never seen near the place to a factor of
    1/floor (20 at the default 0.05), so a confident photo of a vagrant still wins over a weak look-alike
    that lives there, and a gap in the prior's data cannot erase a species."""
    if not 0.0 < floor <= 1.0:
        raise HieraxError(f"the presence floor must lie in (0, 1], got {floor}")
    probs = np.asarray(probs, dtype=np.float32)
    presence = np.asarray(presence, dtype=np.float32)
    if probs.shape[-1] != presence.shape[-1]:
        raise HieraxError(f"{probs.shape[-1]} class probabilities but {presence.shape[-1]} presence values")
    weighted = probs * np.maximum(presence, floor)
    total = weighted.sum(axis=-1, keepdims=True)
    return np.where(total > 0, weighted / np.where(total > 0, total, 1.0), probs)


def apply_prior(
    prior: GeoPrior,
    probs: Any,
    latitudes: Sequence[float | None],
    longitudes: Sequence[float | None],
    dates: Sequence[Any] | None = None,
    floor: float = DEFAULT_FLOOR,
) -> tuple[np.ndarray, np.ndarray]:
    """Combine a batch of image probabilities (N, C) with the prior at each row's place and date. Rows
    without a location (None or NaN) keep their image-only probabilities. Returns (probs, applied mask)."""
    probs = np.atleast_2d(np.asarray(probs, dtype=np.float32))
    if probs.shape[1] != prior.num_classes:
        raise HieraxError(f"the geo prior has {prior.num_classes} classes, the model {probs.shape[1]}")
    lat = np.array([np.nan if v is None else v for v in latitudes], dtype=np.float64)
    lon = np.array([np.nan if v is None else v for v in longitudes], dtype=np.float64)
    applied = np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180)
    out = probs.copy()
    if applied.any():
        rows = np.flatnonzero(applied)
        row_dates = None if dates is None else [dates[i] for i in rows]
        out[rows] = combine(probs[rows], prior.presence(lat[rows], lon[rows], row_dates), floor)
    return out, applied


def describe_prior(path: str | Path) -> dict[str, Any]:
    """What `hierax geoprior info` prints: classes, inputs, hyper-parameters, the fit's summary, file size."""
    path = Path(path)
    prior = load_prior(path)
    return {
        "path": str(path),
        "file_size_mib": round(path.stat().st_size / 2**20, 2),
        "source_model": prior.source_model,
        "classes": prior.num_classes,
        "classes_with_records": len(prior.columns),
        "classes_sample": prior.class_names[:3],
        "inputs": "location and date" if prior.uses_date else "location",
        "encoding": ENCODING,
        "parameters": int(sum(p.numel() for p in prior.net.parameters())),
        "hyperparameters": prior.hyperparameters,
        "fit_summary": prior.fit_summary,
    }
