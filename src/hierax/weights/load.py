"""`load_pretrained_model`: name or path -> (network with weights, ModelInfo), and `load_with_backend`: the
same model to run on torch, ONNX Runtime or TorchScript.

resolve_file (catalog.resolve -> download.fetch) -> read_checkpoint (files) -> build_from_state (create_model,
strict load). Exported files (.onnx, .ts, .pt2) go to hierax.export's runners instead."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from hierax.errors import CheckpointError, HieraxError
from hierax.export.metadata import read_export_metadata
from hierax.export.runners import ExportedRunner, load_exported
from hierax.export.write import export_model
from hierax.models import HieraDet, HieraDetConfig, create_model
from hierax.weights import catalog, download
from hierax.weights.cache import file_sha256, locate
from hierax.weights.files import ModelInfo, read_checkpoint
from hierax.weights.formats import EXPORT_FORMATS, export_format_for, is_exported
from hierax.weights.paths import exports_dir

logger = logging.getLogger(__name__)
CONFIG_FIELDS = frozenset(f.name for f in fields(HieraDetConfig))
# backend -> the format it runs (None: a checkpoint or registry name, in torch)
BACKENDS = {"torch": None, "inductor": None, "onnxruntime": "onnx", "torchscript": "torchscript"}


def resolve_file(name_or_path: str | Path, *, progress: bool = True) -> tuple[Path, catalog.WeightsEntry | None]:
    """The local file for a registry name (downloaded if needed), an existing path, or a training run's folder
    (its model.pt), and the registry entry it belongs to, if any."""
    path, entry = locate(name_or_path)
    if path is None:
        path = download.fetch(entry, progress=progress)
    return path, entry


def build_from_state(
    state: dict[str, torch.Tensor], info: ModelInfo, *, num_classes: int | None = None, config: dict | None = None
) -> HieraDet:
    """Create info.network with info.config (updated by `config`) and load `state` strictly; CheckpointError on
    any mismatch. The classifier is the state's, unless `num_classes` asks for another number of classes (or a
    head the state lacks): then it is new and randomly initialised, as when fine-tuning on other classes."""
    merged = {**info.config, **(config or {})}
    ignored = sorted(set(merged) - CONFIG_FIELDS)
    if ignored:
        logger.debug("Ignoring config keys hierax's HieraDet does not use: %s", ", ".join(ignored))
    head = state.get("classifier.weight")
    state_classes = int(head.shape[0]) if head is not None else 0
    new_head = num_classes is not None and num_classes != state_classes
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        had = f"the file's {state_classes}-class one" if state_classes else "none in the file"
        logger.info("a new %d-class classifier (%s)", num_classes, had)
    net = create_model(
        info.network,
        state_classes if num_classes is None else num_classes,
        **{k: v for k, v in merged.items() if k in CONFIG_FIELDS},
    )
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # same names, other shapes: name the first two, on one line
        detail = "; ".join(line.strip() for line in str(err).splitlines()[1:3]) or str(err)
        raise CheckpointError(f"checkpoint does not fit network '{info.network}': {detail}") from None
    missing = [k for k in result.missing_keys if not (new_head and k.startswith("classifier."))]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
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
) -> tuple[nn.Module | ExportedRunner, ModelInfo]:
    """Load a pretrained model by registry name or file path. Returns (net, model_info).

    inference=True puts the net in eval mode with gradients off. new_size changes the input size the
    signature declares (HieraDet takes any size). `network` overrides the network a file would imply."""
    path, entry = resolve_file(name_or_path, progress=progress)
    if is_exported(path):
        net, info = load_exported(path, device=device)
        return net, info.with_size(new_size) if new_size else info
    state, info = read_checkpoint(path, network=network or (entry.network if entry else None))
    if entry:
        info.config = {**entry.config, **info.config}
    try:
        net = build_from_state(state, info)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    if new_size:
        info = info.with_size(new_size)
    if device is not None or dtype is not None:
        net = net.to(device=device, dtype=dtype)
    if inference:
        net.eval().requires_grad_(False)
    return net, info


def register_file(
    name: str,
    path: str | Path,
    *,
    network: str | None = None,
    resolution: tuple[int, int] | None = None,
    description: str = "",
    aliases: tuple[str, ...] = (),
    persist: bool = True,
) -> catalog.WeightsEntry:
    """Register a model file of one's own under `name` (in the user registry unless persist=False), with the
    network, input size, classes and config its metadata records (`network` and `resolution` override them),
    and its sha256 and size."""
    path = Path(path).expanduser()
    if is_exported(path):
        info, _ = read_export_metadata(path)
    else:
        _, info = read_checkpoint(path, network=network)
    return catalog.register_weights(
        name,
        network=network or info.network,
        resolution=resolution or info.size,
        path=path,
        sha256=file_sha256(path),
        size_mib=round(path.stat().st_size / 2**20, 1),
        num_classes=info.num_classes,
        description=description,
        aliases=aliases,
        config=info.config,
        persist=persist,
    )


def _export_cache_file(source: Path, size: tuple[int, int], fmt: str) -> Path:
    """Where the `fmt` export of `source` at `size` is kept: keyed by the source file, its size and time."""
    stat = source.stat()
    key = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{size}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return exports_dir() / f"{source.stem}-{size[0]}x{size[1]}-{digest}{EXPORT_FORMATS[fmt]}"


def load_with_backend(
    model: str | Path,
    backend: str,
    *,
    device: str | torch.device | None = None,
    size: tuple[int, int] | None = None,
) -> tuple[nn.Module | ExportedRunner, ModelInfo]:
    """Load `model` (a registry name, checkpoint or exported file) to run on `backend`: torch, inductor (torch with
    the network compiled on its first batch: `hierax.models.compiled`), onnxruntime or torchscript. For the last
    two, a checkpoint or name is exported once (ONNX with dynamic batch and size; TorchScript at its
    input size) into `$HIERAX_HOME/exports`, keyed by the source file, its size and time, and the input size.
    The runner's `export_seconds` says how long that export took in this call (0 when the file existed)."""
    if backend not in BACKENDS:
        raise HieraxError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}")
    fmt = BACKENDS[backend]
    source, _ = resolve_file(model)
    if backend == "inductor" and is_exported(source):
        raise HieraxError(f"{model} is a {export_format_for(source)} file; backend inductor compiles checkpoints")
    if fmt is None or is_exported(source):
        if fmt is not None and export_format_for(source) != fmt:
            raise HieraxError(f"{model} is a {export_format_for(source)} file; backend {backend} runs {fmt} files")
        net, info = load_pretrained_model(model, inference=True, device=device, new_size=size)
        if backend == "inductor":
            from hierax.models.compiled import CompiledNet  # imported here: torch.compile is only needed here

            net = CompiledNet(net)
        return net, info
    net, info = load_pretrained_model(source, inference=True, new_size=size)
    target = _export_cache_file(source, info.size, fmt)
    seconds = 0.0
    if not target.is_file():
        logger.info("Exporting %s for %s once, to %s", source.name, backend, target)
        start = time.perf_counter()
        export_model(net, info, target, dynamic_batch=True, dynamic_size=fmt == "onnx")
        seconds = time.perf_counter() - start
        logger.info("Exported in %.1f s; later runs reuse the file", seconds)
    runner, exported_info = load_exported(target, device=device)
    runner.export_seconds = seconds
    return runner, exported_info.with_size(info.size)
