"""The hierax metadata inside an exported file: the ModelInfo and the export options, stored as ONNX
`metadata_props`, as the `hierax.json` extra file of TorchScript and .pt2 archives, and read back here. There
are no sidecar files."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hierax.errors import CheckpointError, HieraxError
from hierax.weights.files import ModelInfo, info_from_metadata
from hierax.weights.formats import EXPORT_DTYPES, GRAPH_FORMATS, export_format_for

if TYPE_CHECKING:
    import onnx

DTYPES = {name: getattr(torch, name) for name in EXPORT_DTYPES}
METADATA_FILE = "hierax.json"
INFO_FIELDS = ("network", "class_to_idx", "signature", "rgb_stats", "config", "task", "version")
_TEXT_FIELDS = ("network", "task", "version")  # stored as plain strings in ONNX; the others as JSON


def export_metadata(info: ModelInfo, options: dict) -> dict:
    """What an exported file carries: the ModelInfo's fields and, under "export", the export options."""
    return {**{name: getattr(info, name) for name in INFO_FIELDS}, "export": options}


def set_onnx_metadata(model: onnx.ModelProto, meta: dict) -> None:
    """Replace an ONNX model's metadata_props by `meta` (strings as they are, the rest as JSON)."""
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)


def _archive_metadata(path: Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            parts = name.split("/")
            if parts[-1] == METADATA_FILE and parts[-2] in ("extra", "extras"):
                return json.loads(archive.read(name).decode())
    raise CheckpointError(f"{path} has no {METADATA_FILE}: it was not exported by hierax")


def read_export_metadata(path: str | Path) -> tuple[ModelInfo, dict]:
    """The checked ModelInfo and the export options stored inside an exported .onnx, .ts or .pt2 file."""
    path = Path(path)
    fmt = export_format_for(path)
    if fmt not in GRAPH_FORMATS:
        raise HieraxError(f"{path} is a checkpoint, not an exported graph: load it with load_pretrained_model")
    if not path.is_file():
        raise CheckpointError(f"exported model not found: {path}")
    try:
        if fmt == "onnx":
            import onnx  # an optional dependency (the onnx extra), needed only for ONNX files

            model = onnx.load(str(path), load_external_data=False)
            raw = {p.key: p.value for p in model.metadata_props}
            meta = {k: v if k in _TEXT_FIELDS else json.loads(v) for k, v in raw.items()}
        else:
            meta = _archive_metadata(path)
    except (OSError, RuntimeError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path} is not a readable {fmt} file: {err}") from None
    info = info_from_metadata(
        meta,
        path,
        network=str(meta.get("network", "")),
        num_outputs=None,
        file_format=fmt,
        required=("network", "class_to_idx", "signature", "rgb_stats"),
    )
    options = meta.get("export", {})
    if not isinstance(options, dict):
        raise CheckpointError(f"{path}: malformed 'export' field (expected the export options as an object)")
    return info, options
