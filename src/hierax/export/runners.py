"""Run exported files: `load_exported` returns a runner that acts like the eager model for inference. Call it
on a normalised (B, 3, H, W) float tensor for logits; `embedding(x)` and `classify(embedding)` work as on HieraDet,
so runners drop into `infer_batch`. A runner refuses input sizes and batches its file was not exported for,
rather than compute wrong outputs."""

from __future__ import annotations

import abc
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hierax.errors import CheckpointError, HieraxError
from hierax.export.metadata import DTYPES, read_export_metadata
from hierax.models.fastpath import has_vnni, is_x86
from hierax.weights.files import ModelInfo
from hierax.weights.formats import export_format_for

logger = logging.getLogger(__name__)


class ExportedRunner(abc.ABC):
    """Inference on an exported graph, shaped like HieraDet: `runner(x)` -> logits, `embedding(x)`,
    `classify(embedding)`, `forward_with_embedding(x)` -> (logits, embedding). Inputs are normalised
    (B, 3, H, W) float tensors; outputs are float32 torch tensors on the runner's device."""

    def __init__(self, info: ModelInfo, options: dict, device: torch.device) -> None:
        self.info = info
        self.options = options
        self.device = device
        self.dtype = DTYPES[options.get("dtype", "float32")]
        self.classifier_weight: torch.Tensor | None = None
        self.classifier_bias: torch.Tensor | None = None
        # Seconds spent exporting the source to make this file, when load_with_backend did so in this call (0 for
        # a file that existed), so that a caller can report the export apart from the inference it times.
        self.export_seconds = 0.0

    @abc.abstractmethod
    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, embedding) from the graph, for a checked input batch."""

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise HieraxError(f"expected a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
        multiple, min_side = self.options.get("size_multiple", 1), self.options.get("min_side", 1)
        if self.options.get("dynamic_size") and any(s % multiple or s < min_side for s in x.shape[-2:]):
            raise HieraxError(
                f"this file takes sides that are multiples of {multiple}, at least {min_side}; got"
                f" {x.shape[-2]}x{x.shape[-1]}: resize the images or use an ONNX export"
            )
        if not self.options.get("dynamic_size") and tuple(x.shape[-2:]) != self.info.size:
            raise HieraxError(
                f"this {self.options.get('format')} file was exported for {self.info.size[0]}x{self.info.size[1]}"
                f" inputs, got {x.shape[-2]}x{x.shape[-1]}; resize the images or export with --dynamic-size"
            )
        if not self.options.get("dynamic_batch") and x.shape[0] != 1:
            raise HieraxError(f"this file was exported for batch 1, got {x.shape[0]}; export with --dynamic-batch")

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, embedding) for a normalised (B, 3, H, W) batch, in one run of the graph."""
        self._check_input(x)
        logits, emb = self._run(x)
        return logits.float(), emb.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_embedding(x)[0]

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, C) image embedding."""
        return self.forward_with_embedding(x)[1]

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """Logits from an embedding, with the classifier weights read from the file."""
        if self.classifier_weight is None:
            return embedding.float()
        return F.linear(embedding.float().to(self.device), self.classifier_weight, self.classifier_bias)

    def eval(self) -> ExportedRunner:
        """No-op, so code written for nn.Module keeps working."""
        return self

    @property
    def num_classes(self) -> int:
        return self.info.num_classes


class OnnxRunner(ExportedRunner):
    """An ONNX Runtime session; CPU by default, CUDA when asked for and available."""

    def __init__(self, path: Path, info: ModelInfo, options: dict, device: torch.device, num_threads: int | None):
        import onnx  # optional dependencies (the onnx extra), needed only for ONNX files
        import onnxruntime as ort

        super().__init__(info, options, device)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise HieraxError("onnxruntime has no CUDA provider here: install onnxruntime-gpu or use device cpu")
            providers.insert(0, "CUDAExecutionProvider")
        if options.get("int8_weight_bits") == 8 and is_x86() and not has_vnni():
            logger.warning(
                "%s has 8-bit int8 weights, made for CPUs with VNNI; this CPU has none, and ONNX Runtime's int8 "
                "kernels may saturate here and drift from the float model: quantise it again on this machine "
                "(hierax export ... --quantize int8, which picks 7-bit weights here)",
                path,
            )
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = num_threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), session_options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self._read_classifier(onnx.load(str(path)))

    def _read_classifier(self, model) -> None:
        from onnx import numpy_helper  # an optional dependency, as above

        if not self.info.num_classes:
            return
        constants = {init.name: init for init in model.graph.initializer}
        gemm = next((n for n in model.graph.node if n.op_type == "Gemm" and "logits" in n.output), None)
        if gemm is None or gemm.input[1] not in constants:
            return
        attrs = {a.name: a.i for a in gemm.attribute if a.type == a.INT}
        weight = torch.from_numpy(numpy_helper.to_array(constants[gemm.input[1]]).copy())
        self.classifier_weight = (weight if attrs.get("transB") else weight.T.contiguous()).to(self.device)
        bias = gemm.input[2] if len(gemm.input) > 2 else ""
        if bias in constants:
            self.classifier_bias = torch.from_numpy(numpy_helper.to_array(constants[bias]).copy()).to(self.device)

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feed = {self.input_name: np.ascontiguousarray(x.detach().float().cpu().numpy())}
        logits, emb = self.session.run(["logits", "embedding"], feed)
        return torch.from_numpy(logits).to(self.device), torch.from_numpy(emb).to(self.device)


class TorchRunner(ExportedRunner):
    """A TorchScript module or a torch.export program's module, run under inference mode."""

    def __init__(self, module, info: ModelInfo, options: dict, device: torch.device, params: dict) -> None:
        super().__init__(info, options, device)
        self.module = module
        weight, bias = params.get("net.classifier.weight"), params.get("net.classifier.bias")
        if info.num_classes and weight is not None:
            self.classifier_weight = weight.detach().float().to(device)
            self.classifier_bias = bias.detach().float().to(device) if bias is not None else None

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            return self.module(x.to(self.device, self.dtype))


def load_exported(
    path: str | Path, device: str | torch.device | None = None, num_threads: int | None = None
) -> tuple[ExportedRunner, ModelInfo]:
    """Load an exported .onnx, .ts or .pt2 file: (runner, ModelInfo). The runner acts like the eager model
    for inference (see ExportedRunner). `num_threads` sets ONNX Runtime's threads (default: torch's)."""
    path = Path(path)
    info, options = read_export_metadata(path)
    device = torch.device(device or "cpu")
    fmt = options.get("format") or export_format_for(path)
    try:
        if fmt == "onnx":
            runner: ExportedRunner = OnnxRunner(path, info, options, device, num_threads)
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path), map_location=device).eval()
            runner = TorchRunner(module, info, options, device, dict(module.named_parameters()))
        else:
            program = torch.export.load(str(path))
            module = program.module().to(device)
            runner = TorchRunner(module, info, options, device, dict(program.state_dict))
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be loaded as {fmt}: {err}") from None
    logger.info("Loaded %s (%s, %s)", path, fmt, options.get("dtype", "float32"))
    return runner, info
