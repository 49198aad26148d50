"""Checkpoint files: the reference `.pt` layout and `.safetensors` with the same metadata, ModelInfo, and the
SAM 2 / timm key converters. Nothing else in hierax parses checkpoint files.

`.pt` is a `torch.save` of {state, birder_version, task, signature, class_to_idx, rgb_stats[, config]} plus
hierax's own `network` key (ignored by the reference). It is read with `torch.load(weights_only=True)`, so
no code is ever unpickled."""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path

import torch

from hierax.atomic import atomic_write
from hierax.errors import CheckpointError
from hierax.transforms import get_size_from_signature, make_signature, normalize_stats

FORMAT_VERSION = f"hierax-{package_version('hierax')}"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")


@dataclass
class ModelInfo:
    """What travels with every model: its network, classes, input signature, normalisation and config."""

    network: str
    class_to_idx: dict[str, int]
    signature: dict
    rgb_stats: dict
    config: dict = field(default_factory=dict)
    task: str = "image_classification"
    version: str = FORMAT_VERSION
    file_format: str | None = None

    @classmethod
    def create(
        cls,
        network: str,
        class_to_idx: dict[str, int],
        size: tuple[int, int] | int,
        rgb_stats: dict | None = None,
        config: dict | None = None,
        task: str = "image_classification",
    ) -> ModelInfo:
        """A ModelInfo for `network` at input `size`, with the reference rgb stats unless given."""
        if isinstance(size, int):
            size = (size, size)
        return cls(
            network=network,
            class_to_idx=dict(class_to_idx),
            signature=make_signature(size, len(class_to_idx)),
            rgb_stats=normalize_stats(rgb_stats),
            config=dict(config or {}),
            task=task,
        )

    @property
    def class_names(self) -> list[str]:
        """Class names in index order."""
        return [name for name, _ in sorted(self.class_to_idx.items(), key=lambda kv: kv[1])]

    @property
    def num_classes(self) -> int:
        return len(self.class_to_idx)

    @property
    def size(self) -> tuple[int, int]:
        """The (H, W) input size of the signature."""
        return get_size_from_signature(self.signature)

    def with_size(self, size: tuple[int, int] | int) -> ModelInfo:
        """A copy whose signature declares input `size`."""
        if isinstance(size, int):
            size = (size, size)
        outputs = self.signature["outputs"][0]["data_shape"][1]
        return ModelInfo(**{**self.__dict__, "signature": make_signature(size, outputs)})

    def metadata(self) -> dict:
        """The reference's metadata fields (plus `network`), as stored in a checkpoint."""
        meta = {
            "birder_version": self.version,
            "task": self.task,
            "signature": self.signature,
            "class_to_idx": self.class_to_idx,
            "rgb_stats": self.rgb_stats,
            "network": self.network,
        }
        if self.config:
            meta["config"] = self.config
        return meta


def write_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor] | torch.nn.Module, info: ModelInfo) -> Path:
    """Write a model checkpoint atomically; `.safetensors` by suffix, else the reference `.pt` layout."""
    path = Path(path)
    if isinstance(state_dict, torch.nn.Module):
        state_dict = state_dict.state_dict()
    state = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    meta = info.metadata()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        text_meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata=text_meta))
    else:
        atomic_write(path, lambda tmp: torch.save({"state": state, **meta}, tmp))
    return path


def _read_pt(path: Path) -> tuple[dict, dict]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            detail = next((ln for ln in str(err).splitlines() if "Unsupported global" in ln), "")
            raise CheckpointError(f"{path} references code, which hierax never unpickles ({detail.strip()})") from None
        raise CheckpointError(f"{path} is corrupt or truncated and cannot be read. Download it again.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{path} is corrupt or truncated and cannot be read ({first}). Download it again."
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if "state" in obj:
        state = obj["state"]
        meta = {k: v for k, v in obj.items() if k != "state"}
    elif "model" in obj and isinstance(obj["model"], dict):
        state, meta = obj["model"], {}
    elif all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, meta = obj, {}
    else:
        raise CheckpointError(f"{path} has no 'state' entry; keys: {', '.join(map(str, list(obj)[:8]))}")
    return state, meta


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw_meta = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is corrupt or truncated and cannot be read ({err}). Download it again."
        ) from None
    meta = {}
    for key, value in raw_meta.items():
        try:
            meta[key] = json.loads(value) if key in ("class_to_idx", "signature", "rgb_stats", "config") else value
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: metadata field '{key}' is not valid JSON") from None
    return state, meta


def _num_outputs(state: dict, meta: dict) -> int:
    if "classifier.weight" in state:
        return int(state["classifier.weight"].shape[0])
    if "signature" in meta:
        return int(meta["signature"]["outputs"][0]["data_shape"][1])
    return 0


def read_checkpoint(path: str | Path, network: str | None = None) -> tuple[dict[str, torch.Tensor], ModelInfo]:
    """Read a `.pt` or `.safetensors` checkpoint: (state_dict, ModelInfo). SAM 2 / timm names are converted.

    The network comes from `network`, else the file's `network` key, else the longest known network name the
    file name starts with, else the state dict's shapes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes). Download it again.")
    state, meta = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pt(path)
    state = convert_state_dict(state)
    network = (
        network or meta.get("network") or network_from_filename(path.name) or infer_network(state, meta.get("config"))
    )
    class_to_idx = meta.get("class_to_idx")
    num_outputs = _num_outputs(state, meta)
    if not class_to_idx or len(class_to_idx) != num_outputs:
        class_to_idx = {f"class_{i}": i for i in range(num_outputs)}
    signature = meta.get("signature") or make_signature((224, 224), num_outputs)
    info = ModelInfo(
        network=network,
        class_to_idx={str(k): int(v) for k, v in class_to_idx.items()},
        signature=signature,
        rgb_stats=normalize_stats(meta.get("rgb_stats")),
        config=dict(meta.get("config") or {}),
        task=str(meta.get("task", "image_classification")),
        version=str(meta.get("birder_version", FORMAT_VERSION)),
        file_format="safetensors" if path.suffix == ".safetensors" else "pt",
    )
    return state, info


def network_from_filename(filename: str) -> str | None:
    """The longest known network name that `filename` starts with (e.g. 'hieradet_d_small_dino-v2.pt')."""
    from hierax.models import list_networks

    matches = [
        n for n in list_networks() if filename == n or filename.startswith(n + "_") or filename.startswith(n + ".")
    ]
    return max(matches, key=len) if matches else None


def infer_network(state: dict[str, torch.Tensor], config: dict | None = None) -> str:
    """Guess the network from a state dict's shapes (after the file's config overrides). Windowed and `_d_`
    variants have identical tensors, so the `_d_` variant (the one the classification weights use) is assumed."""
    from hierax.models.configs import NETWORK_CONFIGS

    if "pos_embed" not in state:
        raise CheckpointError("not a HieraDet checkpoint: no 'pos_embed' tensor")
    dim = int(state["pos_embed"].shape[1])
    depths = []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"body\.stage{stage}\.(\d+)\.", k))}
        depths.append(len(blocks))
    for name, cfg in NETWORK_CONFIGS.items():
        known = {k: v for k, v in (config or {}).items() if k in cfg.__dataclass_fields__}
        cfg = cfg.updated(**known)
        if name.startswith("hieradet_d_") and cfg.embed_dim == dim and list(cfg.depths) == depths:
            return name
    raise CheckpointError(f"no known HieraDet network has width {dim} and depths {depths}")


_SAM2_PREFIXES = ("image_encoder.trunk.", "trunk.", "module.")
_FLAT_RENAMES = [
    (r"^pos_embed_window$", "pos_embed_win"),
    (r"^patch_embed\.proj\.", "stem.proj."),
    (r"\.mlp\.layers\.0\.", ".mlp.0."),
    (r"\.mlp\.layers\.1\.", ".mlp.3."),
    (r"\.mlp\.fc1\.", ".mlp.0."),
    (r"\.mlp\.fc2\.", ".mlp.3."),
    (r"^head\.norm\.", "features.0."),
    (r"^head\.fc\.", "classifier."),
]


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map SAM 2 (`image_encoder.trunk.*`, `mlp.layers.0/1`) and timm `sam2_hiera_*` (`mlp.fc1/fc2`,
    `head.fc`) state dicts to hierax names; hierax/reference dicts pass through unchanged. Other SAM 2 parts
    (neck, decoders) are dropped; SAM 2 has no final LayerNorm, so an identity one is added. Flat `blocks.{i}` are split
    into stages where a block has a `proj` (the first block of stages 2-4)."""
    if any(k.startswith("body.") for k in state):
        return state
    trunk = {}
    for key, value in state.items():
        for prefix in _SAM2_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.startswith(("pos_embed", "patch_embed.", "blocks.", "head.")):
            trunk[key] = value
    if not any(k.startswith("blocks.") for k in trunk):
        return state
    block_ids = sorted({int(k.split(".")[1]) for k in trunk if k.startswith("blocks.")})
    stage_of, stage, index = {}, 1, 0
    for b in block_ids:
        if f"blocks.{b}.proj.weight" in trunk and b != block_ids[0]:
            stage, index = stage + 1, 0
        stage_of[b] = f"body.stage{stage}.{index}"
        index += 1
    out = {}
    for key, value in trunk.items():
        if key.startswith("blocks."):
            _, b, rest = key.split(".", 2)
            key = f"{stage_of[int(b)]}.{rest}"
        for pattern, repl in _FLAT_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    if "features.0.weight" not in out:
        width = out[f"{stage_of[block_ids[-1]]}.mlp.3.weight"].shape[0]
        out["features.0.weight"], out["features.0.bias"] = torch.ones(width), torch.zeros(width)
    return out
