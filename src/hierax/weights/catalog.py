"""The pretrained weights hierax knows, as data, and `register_weights` for users' own files.

Each entry says which network the file holds, the config overrides it needs (the published inat21 weights were
trained and scored with LayerNorm eps 1e-5), where to get it and how to check it."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import hf_hub_url

from hierax.errors import ModelNotFoundError

_HF_ORG = "birder-project"
DEFAULT_MODEL = "hieradet_d_small_dino-v2-inat21"  # what predict, evaluate, embed and serve use unless told


@dataclass(frozen=True)
class WeightsEntry:
    """One pretrained file: what it is, where it lives, how to verify it."""

    name: str
    network: str
    resolution: tuple[int, int]
    description: str
    url: str | None = None
    path: str | None = None
    sha256: str | None = None
    size_mib: float | None = None
    aliases: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)

    @property
    def filename(self) -> str:
        """The file's name, as served and as stored in the cache."""
        source = self.path or self.url or ""
        return Path(source.split("?")[0]).name


def _hf(repo: str, filename: str) -> str:
    return hf_hub_url(f"{_HF_ORG}/{repo}", filename)


_INAT21_EPS = {"layer_norm_eps": 1e-5}
_BUILTIN = [
    WeightsEntry(
        name="hieradet_small_dino-v2-inat21",
        aliases=("hieradet_d_small_dino-v2-inat21",),
        network="hieradet_d_small",
        config=_INAT21_EPS,
        url=_hf("hieradet_d_small_dino-v2-inat21", "hieradet_d_small_dino-v2-inat21.pt"),
        sha256="271fa9ed6a9aa1f4d1fc8bbb4c4cac9d15b264f2ac544efb5cd971412691880d",
        size_mib=159.8,
        resolution=(384, 384),
        description="iNaturalist 2021, 10,000 species, 88.64% top-1 at 384 (DINOv2 backbone, fine-tuned)",
    ),
    WeightsEntry(
        name="hieradet_small_dino-v2-inat21-256px",
        aliases=("hieradet_d_small_dino-v2-inat21-256px",),
        network="hieradet_d_small",
        config=_INAT21_EPS,
        url=_hf("hieradet_d_small_dino-v2-inat21", "hieradet_d_small_dino-v2-inat21-256px.pt"),
        sha256="e1bdeba97eae816ec3ab9b3238d97decf2c34d29b70f9291116ce962b9a4f9df",
        size_mib=159.8,
        resolution=(256, 256),
        description="iNaturalist 2021, 10,000 species, 85.52% top-1 at 256 (86.68% at 384)",
    ),
    WeightsEntry(
        name="hieradet_d_small_dino-v2",
        network="hieradet_d_small",
        url=_hf("hieradet_d_small_dino-v2", "hieradet_d_small_dino-v2.pt"),
        sha256="eb41b8a35445e7f350797094d5e365306b29351e64edd4a316420c23d1e17073",
        size_mib=129.6,
        resolution=(224, 224),
        description="DINOv2 self-supervised backbone, no classifier (the starting point for fine-tuning)",
    ),
    WeightsEntry(
        name="hieradet_d_small_dino-v2-imagenet12k",
        network="hieradet_d_small",
        url=_hf("hieradet_d_small_dino-v2-imagenet12k", "hieradet_d_small_dino-v2-imagenet12k.pt"),
        sha256="b89dd6c13d061fe8a09d051bb3d76e632e650067ca71578e37b02033107c9963",
        size_mib=164.8,
        resolution=(256, 256),
        description="ImageNet-12k classifier on the DINOv2 backbone",
    ),
    WeightsEntry(
        name="hieradet_small_sam2_1",
        network="hieradet_small",
        url=_hf("hieradet_small_sam2_1", "hieradet_small_sam2_1.pt"),
        sha256="2ede3a78389ca74ed37d82dbc1c3410549f1fdafb5a7a94ac02968aa6d3dec80",
        size_mib=129.6,
        resolution=(1024, 1024),
        description="SAM 2.1 small image encoder (windowed attention), no classifier",
    ),
]
_REGISTRY: dict[str, WeightsEntry] = {}


def _add(entry: WeightsEntry, overwrite: bool) -> WeightsEntry:
    for key in (entry.name, *entry.aliases):
        if key in _REGISTRY and not overwrite and _REGISTRY[key].name != entry.name:
            raise ValueError(f"'{key}' is already registered (pass overwrite=True to replace it)")
    for key in (entry.name, *entry.aliases):
        _REGISTRY[key] = entry
    return entry


def register_weights(
    name: str,
    *,
    network: str,
    resolution: tuple[int, int] | int,
    url: str | None = None,
    path: str | Path | None = None,
    sha256: str | None = None,
    size_mib: float | None = None,
    description: str = "",
    aliases: tuple[str, ...] = (),
    config: dict | None = None,
    overwrite: bool = True,
) -> WeightsEntry:
    """Add (or replace) a pretrained entry pointing at a URL or a local file, so that
    `load_pretrained_model(name)` finds it. sha256, when given, is checked after download."""
    from hierax.models import list_networks

    if (url is None) == (path is None):
        raise ValueError("register_weights needs exactly one of url= or path=")
    if network not in list_networks():
        raise ModelNotFoundError(f"Unknown network '{network}' (known: {', '.join(list_networks())})")
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    entry = WeightsEntry(
        name=name,
        network=network,
        resolution=tuple(resolution),
        description=description,
        url=url,
        path=str(path) if path is not None else None,
        sha256=sha256.lower() if sha256 else None,
        size_mib=size_mib,
        aliases=tuple(aliases),
        config=dict(config or {}),
    )
    return _add(entry, overwrite)


def resolve(name: str) -> WeightsEntry:
    """The entry registered under `name` or one of its aliases; ModelNotFoundError suggests close names."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else " Run `hierax models` to list them."
    raise ModelNotFoundError(f"No pretrained model or file named '{name}'.{hint}")


def list_weights() -> list[WeightsEntry]:
    """Every registered entry once (aliases folded), in registration order."""
    seen: dict[str, WeightsEntry] = {}
    for entry in _REGISTRY.values():
        seen.setdefault(entry.name, entry)
    return list(seen.values())


def entry_for_filename(filename: str) -> WeightsEntry | None:
    """The entry whose file is named `filename`, so a manually downloaded published file gets its config."""
    for entry in list_weights():
        if entry.filename == filename:
            return entry
    return None


for _entry in _BUILTIN:
    _add(_entry, overwrite=False)
