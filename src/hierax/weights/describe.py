"""What `hierax info` and `hierax models` print: a model's network, classes, input size and file, and the table of
networks and registered weights. A name whose file is not cached is described from the registry alone, without
downloading and without importing torch, so both commands start fast and work offline."""

from __future__ import annotations

from pathlib import Path

from hierax.models.configs import NETWORK_CONFIGS, list_networks
from hierax.weights import catalog
from hierax.weights.cache import cached_path, is_cached, locate
from hierax.weights.catalog import WeightsEntry
from hierax.weights.formats import is_exported


def parameter_count(network: str, num_classes: int | None = 0) -> int | None:
    """Parameters of `network` with a `num_classes` classifier (0: none), computed from its config without
    building it (no torch); None if either is unknown."""
    if network not in NETWORK_CONFIGS or num_classes is None:
        return None
    return NETWORK_CONFIGS[network].num_parameters(num_classes)


def _not_cached(entry: WeightsEntry) -> dict:
    """What the registry knows about an entry whose file is not on this machine."""
    get = (
        f"`hierax weights download {entry.name}`; on a machine without network, copy the file from one that has "
        "it and run `hierax weights import FILE`"
        if entry.url
        else f"the registered file {entry.path} is missing"
    )
    return {
        "name": entry.name,
        "aliases": list(entry.aliases),
        "network": entry.network,
        "num_classes": entry.num_classes,
        "input_size": list(entry.resolution),
        "num_params": parameter_count(entry.network, entry.num_classes),
        "config": entry.config,
        "description": entry.description,
        "file": entry.filename,
        "file_size_mib": entry.size_mib,
        "sha256": entry.sha256,
        "url": entry.url,
        "cached": False,
        "path": str(cached_path(entry)),
        "note": f"the file is not cached; get it with {get}",
    }


def _file(path: Path, entry: WeightsEntry | None) -> dict:
    """What a model file says about itself: its metadata, and a parameter count for checkpoints."""
    # imported here: reading a file needs torch, and describing an uncached name must stay torch-free (fast)
    from hierax.export.metadata import read_export_metadata
    from hierax.weights.files import read_checkpoint

    extra = {}
    if is_exported(path):
        info, extra["export_options"] = read_export_metadata(path)
        num_params = None
    else:
        state, info = read_checkpoint(path, network=entry.network if entry else None)
        num_params = int(sum(t.numel() for t in state.values()))
    if entry:
        info.config = {**entry.config, **info.config}
    return {
        "name": entry.name if entry else None,
        "path": str(path),
        "cached": is_cached(entry) if entry else None,
        "file_format": info.file_format,
        "file_size_mib": round(path.stat().st_size / 2**20, 1),
        "network": info.network,
        "task": info.task,
        "num_classes": info.num_classes,
        "classes_sample": info.class_names[:5],
        "input_size": list(info.size),
        "rgb_stats": info.rgb_stats,
        "num_params": num_params,
        "config": info.config,
        "version": info.version,
        **extra,
    }


def describe(name_or_path: str | Path) -> dict:
    """What `hierax info` prints: network, classes, input size, rgb stats, parameter count and file format of a
    file, a training run's folder or a registered name. Exported graphs (.onnx, .ts, .pt2) report their stored
    metadata and export options instead of a count. Never downloads: an uncached name gets the registry's
    facts and a note saying how to get the file."""
    path, entry = locate(name_or_path)
    return _not_cached(entry) if path is None else _file(path, entry)


def models_table() -> dict:
    """Networks with parameter counts (millions, without a classifier), and every registered weight with its
    classes and cache state."""
    return {
        "networks": [
            {"network": n, "params_m": round(p / 1e6, 1) if (p := parameter_count(n)) else None}
            for n in list_networks()
        ],
        "weights": [
            {
                "name": e.name,
                "aliases": list(e.aliases),
                "network": e.network,
                "resolution": list(e.resolution),
                "num_classes": e.num_classes,
                "size_mib": e.size_mib,
                "cached": is_cached(e),
                "path": str(cached_path(e)),
                "description": e.description,
            }
            for e in catalog.list_weights()
        ],
    }
