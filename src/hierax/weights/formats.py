"""Which file suffix means which model format: the one map that loading, exporting, `hierax info` and the CLI
read. Torch-free, so the command line can tell formats apart without loading torch."""

from __future__ import annotations

from pathlib import Path

from hierax.errors import HieraxError

# What `export_model` writes, by format name. safetensors is a checkpoint (weights + metadata); the others hold a
# graph that runs without hierax's eager code.
EXPORT_FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "pt2": ".pt2", "safetensors": ".safetensors"}
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
GRAPH_FORMATS = ("onnx", "torchscript", "pt2")
EXPORTED_SUFFIXES = tuple(EXPORT_FORMATS[fmt] for fmt in GRAPH_FORMATS)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")
MODEL_SUFFIXES = CHECKPOINT_SUFFIXES + EXPORTED_SUFFIXES
MODEL_FILE = "model.pt"  # the model in a training run's folder (what `hierax train` and `hierax pretrain` write)


def suffix_of(path: str | Path) -> str:
    """The lower-cased suffix of `path` (".PT" and ".pt" are one format)."""
    return Path(path).suffix.lower()


def looks_like_path(name: str | Path) -> bool:
    """Whether a --model value is meant as a file (a model suffix or a folder in it) rather than a registry name."""
    text = str(name)
    return suffix_of(text) in MODEL_SUFFIXES or "/" in text or "\\" in text


def is_exported(path: str | Path) -> bool:
    """Whether `path` names an exported graph (.onnx, .ts, .pt2) rather than a checkpoint."""
    return suffix_of(path) in EXPORTED_SUFFIXES


def export_format_for(path: str | Path) -> str:
    """The export format a file suffix stands for (onnx, torchscript, pt2, safetensors); HieraxError otherwise."""
    suffix = suffix_of(path)
    for fmt, fmt_suffix in EXPORT_FORMATS.items():
        if suffix == fmt_suffix:
            return fmt
    raise HieraxError(
        f"cannot tell the export format from '{path}': use one of {', '.join(EXPORT_FORMATS.values())} or --format"
    )
