"""`load_pretrained_model`: name or path -> (network with weights, ModelInfo).

resolve (catalog) -> fetch (download) -> read_checkpoint (files) -> create_model -> load_state_dict(strict).
Exported files (.onnx, .ts, .pt2) go to hierax.export's runtimes instead."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from hierax.errors import CheckpointError, ModelNotFoundError
from hierax.models import HieraDet, create_model
from hierax.models.hieradet import HieraDetConfig
from hierax.weights import catalog, download
from hierax.weights.files import CHECKPOINT_SUFFIXES, ModelInfo, read_checkpoint

logger = logging.getLogger(__name__)
EXPORTED_SUFFIXES = (".onnx", ".ts", ".pt2")
_CONFIG_FIELDS = set(HieraDetConfig.__dataclass_fields__)


def _looks_like_path(name: str) -> bool:
    return Path(name).suffix in CHECKPOINT_SUFFIXES + EXPORTED_SUFFIXES or "/" in name or "\\" in name


def resolve_file(name_or_path: str | Path, *, progress: bool = True) -> tuple[Path, catalog.WeightsEntry | None]:
    """The local checkpoint for a registry name (downloaded if needed) or an existing path, and its entry."""
    path = Path(name_or_path)
    if path.is_file():
        return path, catalog.entry_for_filename(path.name)
    name = str(name_or_path)
    if _looks_like_path(name):
        try:
            entry = catalog.resolve(path.stem)
        except ModelNotFoundError:
            raise ModelNotFoundError(f"No such checkpoint file: {name}") from None
        return download.fetch(entry, progress=progress), entry
    entry = catalog.resolve(name)
    return download.fetch(entry, progress=progress), entry


def build_from_state(state: dict[str, torch.Tensor], info: ModelInfo) -> HieraDet:
    """Create info.network with info.config and load `state` strictly; CheckpointError on any mismatch."""
    config = {k: v for k, v in info.config.items() if k in _CONFIG_FIELDS}
    ignored = sorted(set(info.config) - _CONFIG_FIELDS)
    if ignored:
        logger.debug("Ignoring config keys hierax's HieraDet does not use: %s", ", ".join(ignored))
    num_classes = int(state["classifier.weight"].shape[0]) if "classifier.weight" in state else 0
    net = create_model(info.network, num_classes, **config)
    result = net.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} tensors (e.g. {', '.join(result.missing_keys[:3])})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected (e.g. {', '.join(result.unexpected_keys[:3])})")
    if problems:
        raise CheckpointError(f"checkpoint does not match network '{info.network}': {'; '.join(problems)}")
    return net


def load_pretrained_model(
    name_or_path: str | Path,
    *,
    inference: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    new_size: tuple[int, int] | int | None = None,
    network: str | None = None,
    progress: bool = True,
) -> tuple[torch.nn.Module, ModelInfo]:
    """Load a pretrained model by registry name or file path. Returns (net, model_info).

    inference=True puts the net in eval mode with gradients off. new_size changes the input size the
    signature declares (HieraDet takes any size). `network` overrides the network a file would imply."""
    if Path(name_or_path).suffix in EXPORTED_SUFFIXES and Path(name_or_path).is_file():
        from hierax.export import load_exported

        net, info = load_exported(name_or_path, device=device)
        return net, info.with_size(new_size) if new_size else info
    path, entry = resolve_file(name_or_path, progress=progress)
    state, info = read_checkpoint(path, network=network or (entry.network if entry else None))
    if entry:
        info.config = {**entry.config, **info.config}
    try:
        net = build_from_state(state, info)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit network '{info.network}': {err}") from None
    if new_size:
        info = info.with_size(new_size)
    if device is not None or dtype is not None:
        net = net.to(device=device, dtype=dtype)
    if inference:
        net.eval().requires_grad_(False)
    return net, info


def describe(name_or_path: str | Path, *, progress: bool = True) -> dict:
    """What `hierax info` prints: network, classes, input size, rgb stats, parameter count, file format.
    Exported graphs (.onnx, .ts, .pt2) report their stored metadata and export options instead of a count."""
    path, entry = resolve_file(name_or_path, progress=progress)
    extra = {}
    if path.suffix in EXPORTED_SUFFIXES:
        from hierax.export import read_export_metadata

        info, extra["export_options"] = read_export_metadata(path)
        num_params = None
    else:
        state, info = read_checkpoint(path, network=entry.network if entry else None)
        num_params = int(sum(t.numel() for t in state.values()))
    if entry:
        info.config = {**entry.config, **info.config}
    names = info.class_names
    return {
        "name": entry.name if entry else None,
        "path": str(path),
        "file_format": info.file_format,
        "file_size_mib": round(path.stat().st_size / 2**20, 1),
        "network": info.network,
        "task": info.task,
        "num_classes": info.num_classes,
        "classes_sample": names[:5],
        "input_size": list(info.size),
        "rgb_stats": info.rgb_stats,
        "num_params": num_params,
        "config": info.config,
        "version": info.version,
        **extra,
    }
