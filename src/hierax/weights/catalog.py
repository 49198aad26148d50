"""The pretrained weights hierax knows, as data, and `register_weights` for users' own files.

Each entry says which network the file holds, its input size and number of classes, the config overrides it
needs (the published inat21 weights were trained and scored with LayerNorm eps 1e-5), where to get it and how to
check it. Names are looked up in three layers, the first match winning: entries registered in this process,
the user registry file `$HIERAX_HOME/registry.json` (written by `register_weights(..., persist=True)` and
`hierax weights register`, so every later process knows the name), and the built-in entries below.
Torch-free: `hierax models` and `hierax info` read it without loading torch."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hierax.atomic import atomic_write
from hierax.errors import HieraxError, ModelNotFoundError
from hierax.models.configs import list_networks
from hierax.sizes import check_size
from hierax.weights.paths import registry_path

_HF_ORG = "birder-project"
DEFAULT_MODEL = "hieradet_d_small_dino-v2-inat21"  # what predict, evaluate, embed and serve use unless told
REGISTRY_VERSION = 1


@dataclass(frozen=True)
class WeightsEntry:
    """One pretrained file: what it is, where it lives, how to verify it. num_classes is 0 for a backbone
    without a classifier and None where unknown."""

    name: str
    network: str
    resolution: tuple[int, int]
    description: str
    url: str | None = None
    path: str | None = None
    sha256: str | None = None
    size_mib: float | None = None
    num_classes: int | None = None
    aliases: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)

    @property
    def filename(self) -> str:
        """The file's name, as served and as stored in the cache."""
        source = self.path or self.url or ""
        return Path(source.split("?")[0]).name

    def to_json(self) -> dict:
        """The entry as the user registry file stores it."""
        data = dataclasses.asdict(self)
        data.update(resolution=list(self.resolution), aliases=list(self.aliases))
        return {k: v for k, v in data.items() if v not in (None, "", [], {})}


def _hf(repo: str, filename: str) -> str:
    """The Hugging Face Hub URL of a published file; HF_ENDPOINT names a mirror, as for huggingface_hub (whose
    own hf_hub_url would cost `hierax models` and `hierax info` half a second of imports)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{_HF_ORG}/{repo}/resolve/main/{filename}"


_INAT21_EPS = {"layer_norm_eps": 1e-5}
_BUILTIN_ENTRIES = [
    WeightsEntry(
        name="hieradet_small_dino-v2-inat21",
        aliases=("hieradet_d_small_dino-v2-inat21",),
        network="hieradet_d_small",
        config=_INAT21_EPS,
        url=_hf("hieradet_d_small_dino-v2-inat21", "hieradet_d_small_dino-v2-inat21.pt"),
        sha256="271fa9ed6a9aa1f4d1fc8bbb4c4cac9d15b264f2ac544efb5cd971412691880d",
        size_mib=159.8,
        num_classes=10000,
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
        num_classes=10000,
        resolution=(256, 256),
        description="iNaturalist 2021, 10,000 species, 85.52% top-1 at 256 (86.68% at 384)",
    ),
    WeightsEntry(
        name="hieradet_d_small_dino-v2",
        network="hieradet_d_small",
        url=_hf("hieradet_d_small_dino-v2", "hieradet_d_small_dino-v2.pt"),
        sha256="eb41b8a35445e7f350797094d5e365306b29351e64edd4a316420c23d1e17073",
        size_mib=129.6,
        num_classes=0,
        resolution=(224, 224),
        description="DINOv2 self-supervised backbone, no classifier (the starting point for fine-tuning)",
    ),
    WeightsEntry(
        name="hieradet_d_small_dino-v2-imagenet12k",
        network="hieradet_d_small",
        url=_hf("hieradet_d_small_dino-v2-imagenet12k", "hieradet_d_small_dino-v2-imagenet12k.pt"),
        sha256="b89dd6c13d061fe8a09d051bb3d76e632e650067ca71578e37b02033107c9963",
        size_mib=164.8,
        num_classes=11821,  # the published model card: ImageNet-12K, 11821 classes
        resolution=(256, 256),
        description="ImageNet-12k classifier on the DINOv2 backbone",
    ),
    WeightsEntry(
        name="hieradet_small_sam2_1",
        network="hieradet_small",
        url=_hf("hieradet_small_sam2_1", "hieradet_small_sam2_1.pt"),
        sha256="2ede3a78389ca74ed37d82dbc1c3410549f1fdafb5a7a94ac02968aa6d3dec80",
        size_mib=129.6,
        num_classes=0,
        resolution=(1024, 1024),
        description="SAM 2.1 small image encoder (windowed attention), no classifier",
    ),
]


def _by_key(entries: list[WeightsEntry]) -> dict[str, WeightsEntry]:
    """Entries keyed by name and by every alias."""
    return {key: entry for entry in entries for key in (entry.name, *entry.aliases)}


_BUILTIN = _by_key(_BUILTIN_ENTRIES)
_SESSION: dict[str, WeightsEntry] = {}  # register_weights without persist: this process only
_user_cache: dict = {"stamp": None, "entries": {}}


# ---- the user registry file ----


def _entry_from_json(data: dict, where: Path) -> WeightsEntry:
    try:
        fields = dict(data)
        fields["resolution"] = check_size(fields["resolution"], what="resolution")
        fields["aliases"] = tuple(fields.get("aliases", ()))
        fields.setdefault("description", "")
        return WeightsEntry(**fields)
    except (KeyError, TypeError, HieraxError) as err:
        raise HieraxError(f"{where} has a malformed entry {data!r} ({err}); fix or remove it") from None


def _read_user_file(path: Path) -> list[WeightsEntry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HieraxError(f"cannot read the user registry {path} ({err}); fix or delete it") from None
    if not isinstance(data, dict) or not isinstance(data.get("weights"), list):
        raise HieraxError(f"{path} is not a hierax registry (no 'weights' list); fix or delete it")
    return [_entry_from_json(item, path) for item in data["weights"]]


def _user_entries() -> dict[str, WeightsEntry]:
    """The user registry's entries by name and alias, re-read whenever the file (or HIERAX_HOME) changes."""
    path = registry_path()
    try:
        stat = path.stat()
        stamp = (str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)  # every atomic rewrite is a new inode
    except FileNotFoundError:
        stamp = (str(path), None, None, None)
    if stamp != _user_cache["stamp"]:
        entries = _read_user_file(path) if stamp[1] is not None else []
        _user_cache.update(stamp=stamp, entries=_by_key(entries))
    return _user_cache["entries"]


def _write_user_file(entries: list[WeightsEntry]) -> None:
    text = json.dumps({"version": REGISTRY_VERSION, "weights": [e.to_json() for e in entries]}, indent=1) + "\n"
    atomic_write(registry_path(), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _user_list() -> list[WeightsEntry]:
    return list({e.name: e for e in _user_entries().values()}.values())


# ---- registering and looking up ----


def _known() -> dict[str, WeightsEntry]:
    """Every name and alias, the first layer that has it winning: this process, the user file, the built-ins."""
    return {**_BUILTIN, **_user_entries(), **_SESSION}


def register_weights(
    name: str,
    *,
    network: str,
    resolution: tuple[int, int] | int,
    url: str | None = None,
    path: str | Path | None = None,
    sha256: str | None = None,
    size_mib: float | None = None,
    num_classes: int | None = None,
    description: str = "",
    aliases: tuple[str, ...] = (),
    config: dict | None = None,
    overwrite: bool = True,
    persist: bool = False,
) -> WeightsEntry:
    """Add (or replace) an entry pointing at a URL or a local file, so that `load_pretrained_model(name)` finds
    it. sha256, when given, is checked after download and on `hierax weights import`.

    persist=True writes it to the user registry ($HIERAX_HOME/registry.json) instead of this process's table,
    so that every later process (`hierax predict --model NAME`) knows it; a local path is stored absolute."""
    if (url is None) == (path is None):
        raise ValueError("register_weights needs exactly one of url= or path=")
    if network not in list_networks():
        raise ModelNotFoundError(f"Unknown network '{network}' (known: {', '.join(list_networks())})")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise HieraxError(f"sha256 must be 64 hexadecimal digits, got '{sha256}'")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 0):
        raise HieraxError(f"num_classes must be a whole number >= 0 (0: a backbone), got {num_classes!r}")
    if path is not None and persist:
        path = Path(path).expanduser().resolve()
    entry = WeightsEntry(
        name=name,
        network=network,
        resolution=check_size(resolution, what="resolution"),
        description=description,
        url=url,
        path=str(path) if path is not None else None,
        sha256=sha256.lower() if sha256 else None,
        size_mib=size_mib,
        num_classes=num_classes,
        aliases=tuple(aliases),
        config=dict(config or {}),
    )
    if not overwrite:
        for key in (entry.name, *entry.aliases):
            taken = _known().get(key)
            if taken is not None and taken.name != entry.name:
                raise ValueError(f"'{key}' is already registered for '{taken.name}' (pass overwrite=True to replace)")
    for key in [k for k, e in _SESSION.items() if e.name == name]:  # the latest registration wins
        del _SESSION[key]
    if persist:
        _write_user_file([e for e in _user_list() if e.name != name] + [entry])
    else:
        _SESSION.update(_by_key([entry]))
    return entry


def unregister_weights(name: str, *, persist: bool = False) -> WeightsEntry:
    """Remove an entry registered in this process (or, with persist=True, from the user registry file) and
    return it; built-in entries cannot be removed. A cached file is left where it is."""
    table = _user_entries() if persist else _SESSION
    entry = table.get(name)
    if entry is None:
        where = f"the user registry {registry_path()}" if persist else "this process's registrations"
        raise ModelNotFoundError(f"'{name}' is not in {where}")
    if persist:
        _write_user_file([e for e in _user_list() if e.name != entry.name])
    else:
        for key in [k for k, e in _SESSION.items() if e.name == entry.name]:
            del _SESSION[key]
    return entry


def resolve(name: str) -> WeightsEntry:
    """The entry registered under `name` or one of its aliases. ModelNotFoundError says when `name` is an
    architecture rather than weights, and otherwise suggests close names."""
    known = _known()
    if name in known:
        return known[name]
    if name in list_networks():
        raise ModelNotFoundError(
            f"'{name}' names a network (an architecture), not weights. Train it with "
            f"`hierax train --network {name} ...` and pass the model.pt it writes, or pick pretrained weights "
            "from `hierax models`."
        )
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else " Run `hierax models` to list them."
    raise ModelNotFoundError(f"No pretrained model or file named '{name}'.{hint}")


def resolve_or_none(name: str) -> WeightsEntry | None:
    """The entry registered under `name` or one of its aliases, or None."""
    return _known().get(name)


def list_weights() -> list[WeightsEntry]:
    """Every entry once (aliases folded): the built-ins, then the user registry's, then this process's; an entry
    that replaces a built-in takes its place."""
    seen: dict[str, WeightsEntry] = {}
    for key, entry in _known().items():
        if key == entry.name:
            seen[entry.name] = entry
    return list(seen.values())


def list_models(include_networks: bool = False) -> list[str]:
    """Names `load_pretrained_model` accepts (registered weights and their aliases); with include_networks,
    the architecture names `create_model` accepts too."""
    names = [alias for entry in list_weights() for alias in (entry.name, *entry.aliases)]
    return names + list_networks() if include_networks else names


def entry_for_filename(filename: str) -> WeightsEntry | None:
    """The entry whose file is named `filename`, so a manually downloaded published file gets its config."""
    return next((entry for entry in list_weights() if entry.filename == filename), None)


def entry_for_sha256(sha256: str) -> WeightsEntry | None:
    """The entry whose registered checksum is `sha256`, so an imported file is recognised by its content."""
    return next((entry for entry in list_weights() if entry.sha256 == sha256.lower()), None)
