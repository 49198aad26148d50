"""Checkpoint files: the reference `.pt` layout and `.safetensors` with the same metadata, and ModelInfo.
Nothing else in hierax parses checkpoint files.

`.pt` is a `torch.save` of {state, birder_version, task, signature, class_to_idx, rgb_stats[, config]} plus
hierax's own `network` key (ignored by the reference). It is read with `torch.load(weights_only=True)`, so
no code is ever unpickled. The metadata is checked when read (`info_from_metadata`), so a malformed field is a
CheckpointError naming it rather than a KeyError later."""

from __future__ import annotations

import json
import numbers
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hierax.atomic import atomic_write
from hierax.errors import CheckpointError, HieraxError, NoClassifierError
from hierax.models.configs import NETWORK_CONFIGS, list_networks
from hierax.sizes import check_size
from hierax.transforms import get_size_from_signature, make_signature, normalize_stats
from hierax.weights.convert import convert_state_dict
from hierax.weights.formats import MODEL_FILE, suffix_of

FORMAT_VERSION = f"hierax-{package_version('hierax')}"
JSON_FIELDS = ("class_to_idx", "signature", "rgb_stats", "config")  # stored as JSON text where metadata is text


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
        return cls(
            network=network,
            class_to_idx=dict(class_to_idx),
            signature=make_signature(check_size(size), len(class_to_idx)),
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
        outputs = self.signature["outputs"][0]["data_shape"][1]
        return ModelInfo(**{**self.__dict__, "signature": make_signature(check_size(size), outputs)})

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


def require_classifier(info: ModelInfo, purpose: str) -> None:
    """NoClassifierError unless the model has a classifier: a backbone (what `hierax pretrain` writes, or the
    registry's dino-v2 and sam2_1 entries) gives embeddings, not species. `purpose` is what was asked ("predict",
    "evaluate", "serve") and appears in the message."""
    if info.num_classes > 0:
        return
    raise NoClassifierError(
        f"cannot {purpose}: this {info.network} model is a backbone without a classifier (0 classes). Use "
        "`hierax embed` for its embeddings, or fine-tune a classifier on it with "
        "`hierax train --init-from MODEL ...` and use the model.pt that writes."
    )


# ---- checking the metadata ----


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_signature(signature: object, where: str) -> dict:
    try:
        inputs = signature["inputs"][0]["data_shape"]
        outputs = signature["outputs"][0]["data_shape"]
        if len(inputs) != 4 or len(outputs) != 2 or not all(_is_int(v) for v in [*inputs, *outputs]):
            raise ValueError(f"data shapes {inputs} and {outputs}")
        check_size((inputs[2], inputs[3]), what="its input")
    except (KeyError, IndexError, TypeError, ValueError, HieraxError) as err:
        reason = f"no {err}" if isinstance(err, KeyError) else str(err) or type(err).__name__
        raise CheckpointError(
            f"{where}: malformed 'signature' field ({reason}); expected "
            "{'inputs': [{'data_shape': [0, 3, H, W]}], 'outputs': [{'data_shape': [0, N]}]}"
        ) from None
    return signature


def _check_class_to_idx(class_to_idx: object, where: str) -> dict[str, int]:
    if not isinstance(class_to_idx, dict) or not all(_is_int(v) for v in class_to_idx.values()):
        raise CheckpointError(f"{where}: malformed 'class_to_idx' field (expected {{name: index}})")
    checked = {str(k): int(v) for k, v in class_to_idx.items()}
    if sorted(checked.values()) != list(range(len(checked))):
        raise CheckpointError(f"{where}: 'class_to_idx' indices are not 0..{len(checked) - 1}, each once")
    return checked


def _check_rgb_stats(rgb_stats: object, where: str) -> dict[str, list[float]]:
    try:
        stats = normalize_stats(rgb_stats)
        if len(stats["mean"]) != 3 or len(stats["std"]) != 3 or min(stats["std"]) <= 0:
            raise ValueError("three means and three positive stds")
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{where}: malformed 'rgb_stats' field (expected {{'mean': [3 floats], 'std': [3 floats]}}: {err})"
        ) from None
    return stats


def info_from_metadata(
    meta: dict,
    where: str | Path,
    *,
    network: str,
    num_outputs: int | None,
    file_format: str,
    required: tuple[str, ...] = (),
) -> ModelInfo:
    """A checked ModelInfo from a file's metadata. `num_outputs` is the classifier's (0: a backbone, which has
    no classes whatever its class_to_idx says; None: as many as class_to_idx names). Fields in `required` must be
    present; the others have defaults (class_0.. without class names, 224x224 without a signature, the
    reference rgb stats)."""
    where = str(where)
    missing = [name for name in required if name not in meta]
    if missing:
        raise CheckpointError(f"{where} lacks hierax metadata ({', '.join(missing)}); write or export it with hierax")
    class_to_idx = meta.get("class_to_idx")
    if class_to_idx is not None:
        class_to_idx = _check_class_to_idx(class_to_idx, where)
    if num_outputs is None:
        num_outputs = len(class_to_idx or {})
    if class_to_idx is None or num_outputs == 0:
        class_to_idx = {f"class_{i}": i for i in range(num_outputs)}
    if len(class_to_idx) != num_outputs:
        raise CheckpointError(
            f"{where}: 'class_to_idx' names {len(class_to_idx)} classes but the classifier has {num_outputs} outputs"
        )
    config = meta.get("config") or {}
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: malformed 'config' field (expected a JSON object)")
    signature = meta.get("signature")
    return ModelInfo(
        network=network,
        class_to_idx=class_to_idx,
        signature=make_signature((224, 224), num_outputs) if signature is None else _check_signature(signature, where),
        rgb_stats=_check_rgb_stats(meta.get("rgb_stats"), where),
        config=dict(config),
        task=str(meta.get("task", "image_classification")),
        version=str(meta.get("birder_version", meta.get("version", FORMAT_VERSION))),
        file_format=file_format,
    )


# ---- writing and reading ----


def write_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor] | torch.nn.Module, info: ModelInfo) -> Path:
    """Write a model checkpoint atomically; `.safetensors` by suffix, else the reference `.pt` layout."""
    path = Path(path)
    if isinstance(state_dict, torch.nn.Module):
        state_dict = state_dict.state_dict()
    state = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    meta = info.metadata()
    if suffix_of(path) == ".safetensors":
        text_meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata=text_meta))
    else:
        atomic_write(path, lambda tmp: torch.save({"state": state, **meta}, tmp))
    return path


def _is_training_state(obj: dict) -> bool:
    """hierax's training_state.pt: the raw weights beside the optimizer, EMA and step, for --resume."""
    return "optimizer" in obj and "model" in obj and ("step" in obj or "ema" in obj)


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
    if _is_training_state(obj):
        raise CheckpointError(
            f"{path} is a training state (weights with optimizer, EMA and step, for `hierax train --resume`), "
            f"not a model with its classes: use {path.parent / MODEL_FILE}, which the same run writes"
        )
    if "state" in obj:
        state = obj["state"]
        meta = {k: v for k, v in obj.items() if k != "state"}
    elif "model" in obj and isinstance(obj["model"], dict):
        state, meta = obj["model"], {}
    elif all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, meta = obj, {}
    else:
        raise CheckpointError(f"{path} has no 'state' entry; keys: {', '.join(map(str, list(obj)[:8]))}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state' is not a dict of tensors")
    return state, meta


def _read_safetensors(path: Path) -> tuple[dict, dict]:
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
            meta[key] = json.loads(value) if key in JSON_FIELDS else value
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: metadata field '{key}' is not valid JSON") from None
    return state, meta


def read_checkpoint(path: str | Path, network: str | None = None) -> tuple[dict[str, torch.Tensor], ModelInfo]:
    """Read a `.pt` or `.safetensors` checkpoint: (state_dict, ModelInfo). SAM 2 / timm names are converted.

    The network comes from `network`, else the file's `network` key, else the longest known network name the
    file name starts with, else the state dict's shapes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes). Download it again.")
    is_safetensors = suffix_of(path) == ".safetensors"
    state, meta = _read_safetensors(path) if is_safetensors else _read_pt(path)
    state = convert_state_dict(state)
    network = (
        network or meta.get("network") or network_from_filename(path.name) or infer_network(state, meta.get("config"))
    )
    num_outputs = int(state["classifier.weight"].shape[0]) if "classifier.weight" in state else 0
    file_format = "safetensors" if is_safetensors else "pt"
    info = info_from_metadata(meta, path, network=network, num_outputs=num_outputs, file_format=file_format)
    return state, info


def network_from_filename(filename: str) -> str | None:
    """The longest known network name that `filename` starts with (e.g. 'hieradet_d_small_dino-v2.pt')."""
    matches = [
        n for n in list_networks() if filename == n or filename.startswith(n + "_") or filename.startswith(n + ".")
    ]
    return max(matches, key=len) if matches else None


def infer_network(state: dict[str, torch.Tensor], config: dict | None = None) -> str:
    """Guess the network from a state dict's shapes (after the file's config overrides). Windowed and `_d_`
    variants have identical tensors, so the `_d_` variant (the one the classification weights use) is assumed."""
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
