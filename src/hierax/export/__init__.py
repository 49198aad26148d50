"""Exported models: `write` turns a network into an ONNX, TorchScript, torch.export (.pt2) or safetensors file
with its ModelInfo inside; `runners` runs the exported graphs; `metadata` reads and writes what they carry.
Choosing a runtime for a model (and exporting it once for it) is `hierax.weights.load.load_with_backend`."""

from hierax.export.metadata import DTYPES, read_export_metadata
from hierax.export.runners import ExportedRunner, OnnxRunner, TorchRunner, load_exported
from hierax.export.write import export_model, quantize_linear_int8, quantize_onnx

__all__ = [
    "DTYPES",
    "ExportedRunner",
    "OnnxRunner",
    "TorchRunner",
    "export_model",
    "load_exported",
    "quantize_linear_int8",
    "quantize_onnx",
    "read_export_metadata",
]
