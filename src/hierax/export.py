"""Export a model to ONNX, TorchScript, torch.export (.pt2) or safetensors, and run the exported files.

Every exported file carries its ModelInfo (class_to_idx, signature, rgb_stats, network, config, version) and
the export options inside itself: ONNX `metadata_props`, TorchScript and .pt2 extra files, safetensors
metadata. There are no sidecar files.

ONNX, TorchScript and .pt2 files hold a graph with two outputs, `logits` and `embedding`. `load_exported`
returns a runner that acts like the eager model for inference: call it on a (B, 3, H, W) float tensor for
logits; `embedding(x)` and `classify(embedding)` work as on HieraDet, so runners drop into `infer_batch`.

ONNX and .pt2 exports may have a dynamic batch and a dynamic height and width (the network takes any size).
TorchScript is traced, which fixes the input size (the batch may still be dynamic); its runner refuses other
sizes rather than compute wrong outputs. Optional int8 dynamic quantisation replaces the Linear layers of the
blocks by int8 ones (weights per tensor, activations quantised on the fly); the classifier stays float.
"""

from __future__ import annotations

import abc
import copy
import hashlib
import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hierax.atomic import atomic_write
from hierax.errors import CheckpointError, HieraxError
from hierax.weights.files import ModelInfo, write_checkpoint

logger = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "pt2": ".pt2", "safetensors": ".safetensors"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE_FORMATS = ("onnx", "torchscript")
METADATA_FILE = "hierax.json"
_INFO_FIELDS = ("network", "class_to_idx", "signature", "rgb_stats", "config", "task", "version")


class _TwoOutputs(nn.Module):
    """The graph that gets exported: image batch -> (logits, embedding)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.net.embedding(x)
        return self.net.classify(emb), emb


def format_for_path(path: str | Path) -> str:
    """The export format a file suffix stands for; HieraxError for unknown suffixes."""
    suffix = Path(path).suffix
    for fmt, fmt_suffix in FORMATS.items():
        if suffix == fmt_suffix:
            return fmt
    raise HieraxError(f"cannot tell the export format from '{path}': use one of {', '.join(FORMATS.values())}")


def quantize_linear_int8(net: nn.Module) -> nn.Module:
    """A copy of `net` whose block Linear layers are int8 dynamically quantised (the classifier stays float)."""
    from torch.ao.quantization import quantize_dynamic

    quantized = copy.deepcopy(net).eval()
    for module in quantized.body.modules():
        if isinstance(module, nn.Linear):  # torch's quantiser matches exact types; hieradet.Linear is a subclass
            module.__class__ = nn.Linear
    quantized.body = quantize_dynamic(quantized.body, {nn.Linear}, dtype=torch.qint8)
    return quantized


def _metadata(info: ModelInfo, options: dict) -> dict:
    return {**{name: getattr(info, name) for name in _INFO_FIELDS}, "export": options}


def _info_from_metadata(meta: dict, file_format: str) -> ModelInfo:
    missing = [name for name in ("network", "class_to_idx", "signature", "rgb_stats") if name not in meta]
    if missing:
        raise CheckpointError(f"exported file lacks hierax metadata ({', '.join(missing)}); export it with hierax")
    fields = {name: meta[name] for name in _INFO_FIELDS if name in meta}
    fields["class_to_idx"] = {str(k): int(v) for k, v in fields["class_to_idx"].items()}
    return ModelInfo(**fields, file_format=file_format)


# torch.export (.pt2) programs check their shape guards at run time, and guards taken at the example size
# (no window padding, more than one window) fail elsewhere. With sides that are multiples of 32, at least 64,
# those guards hold for every size, so a dynamic pt2 covers that lattice. ONNX drops the guards and pads
# explicitly, so its dynamic sides are free.
PT2_SIZE_MULTIPLE = 32
PT2_MIN_SIDE = 64


def _dynamic_shapes(fmt: str, dynamic_batch: bool, dynamic_size: bool) -> dict | None:
    dims = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim.DYNAMIC
    if dynamic_size and fmt == "pt2":
        dims.update(
            {
                2: torch.export.Dim("blocks_h", min=PT2_MIN_SIDE // PT2_SIZE_MULTIPLE, max=256) * PT2_SIZE_MULTIPLE,
                3: torch.export.Dim("blocks_w", min=PT2_MIN_SIDE // PT2_SIZE_MULTIPLE, max=256) * PT2_SIZE_MULTIPLE,
            }
        )
    elif dynamic_size:
        dims.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    return {"x": dims} if dims else None


def export_model(
    net: nn.Module,
    info: ModelInfo,
    path: str | Path,
    *,
    fmt: str | None = None,
    dynamic_batch: bool = False,
    dynamic_size: bool = False,
    dtype: str = "float32",
    quantize: str | None = None,
) -> Path:
    """Write `net` (with `info` inside the file) to `path` in format `fmt` (default: from the suffix).

    The example input has the signature's size (info.size). Returns the path written (atomically)."""
    path = Path(path)
    if not isinstance(net, nn.Module):
        raise HieraxError("export starts from a checkpoint (.pt, .safetensors) or a registered name, not an export")
    fmt = fmt or format_for_path(path)
    if fmt not in FORMATS:
        raise HieraxError(f"unknown export format '{fmt}': choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise HieraxError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    if quantize not in (None, "int8"):
        raise HieraxError(f"unknown quantisation '{quantize}': the only choice is int8")
    if quantize and fmt not in QUANTIZE_FORMATS:
        raise HieraxError(f"int8 quantisation is available for {' and '.join(QUANTIZE_FORMATS)}, not {fmt}")
    if quantize and dtype != "float32":
        raise HieraxError("int8 quantisation starts from a float32 model: leave --dtype at float32")
    if fmt == "onnx" and dtype != "float32":
        raise HieraxError("ONNX export is float32 (ONNX Runtime's CPU kernels); use --quantize int8 to shrink it")
    if fmt == "torchscript" and dynamic_size:
        raise HieraxError("TorchScript traces fix the input size; export to onnx or pt2 for a dynamic size")
    if fmt == "pt2" and dynamic_size and any(side % PT2_SIZE_MULTIPLE or side < PT2_MIN_SIDE for side in info.size):
        raise HieraxError(
            f"a dynamic-size pt2 export needs sides that are multiples of {PT2_SIZE_MULTIPLE}, at least {PT2_MIN_SIDE}"
        )

    net = net.eval()
    if fmt == "safetensors":
        state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in net.state_dict().items()}
        return write_checkpoint(path, state, info)

    options = {"format": fmt, "dtype": dtype, "quantize": quantize}
    options.update(dynamic_batch=dynamic_batch, dynamic_size=dynamic_size)
    if fmt == "pt2" and dynamic_size:
        options.update(size_multiple=PT2_SIZE_MULTIPLE, min_side=PT2_MIN_SIDE)
    meta = _metadata(info, options)
    net = copy.deepcopy(net).to("cpu", DTYPES[dtype])
    if quantize and fmt == "torchscript":
        net = quantize_linear_int8(net)
    wrapper = _TwoOutputs(net).eval()
    # A batch of 2 keeps a dynamic batch from being specialised to 1.
    example = torch.randn(2 if dynamic_batch else 1, 3, *info.size, dtype=DTYPES[dtype])
    logger.info("Exporting %s to %s (%s, %s)", info.network, path, fmt, dtype)
    files = {METADATA_FILE: json.dumps(meta)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # traces fix the size; runners enforce it
        if fmt == "onnx":
            atomic_write(path, lambda tmp: _write_onnx(wrapper, example, tmp, meta, dynamic_batch, dynamic_size))
        elif fmt == "torchscript":
            traced = torch.jit.trace(wrapper, example, check_trace=False)
            atomic_write(path, lambda tmp: torch.jit.save(traced, tmp, _extra_files=files))
        else:
            shapes = _dynamic_shapes(fmt, dynamic_batch, dynamic_size)
            program = torch.export.export(wrapper, (example,), dynamic_shapes=shapes)
            atomic_write(path, lambda tmp: torch.export.save(program, tmp, extra_files=files))
    return path


def _write_onnx(
    wrapper: nn.Module, example: torch.Tensor, out: str, meta: dict, dynamic_batch: bool, dynamic_size: bool
) -> None:
    import onnx

    with tempfile.TemporaryDirectory(prefix="hierax-onnx-") as tmpdir:
        plain = Path(tmpdir) / "model.onnx"
        torch.onnx.export(
            wrapper,
            (example,),
            str(plain),
            dynamo=True,
            input_names=["input"],
            output_names=["logits", "embedding"],
            dynamic_shapes=_dynamic_shapes("onnx", dynamic_batch, dynamic_size),
            external_data=False,
            verbose=False,
        )
        if meta["export"]["quantize"] == "int8":
            quantized = Path(tmpdir) / "model.int8.onnx"
            _quantize_onnx_graph(plain, quantized)
            plain = quantized
        model = onnx.load(str(plain))
    _set_onnx_metadata(model, meta)
    onnx.save(model, out)


def _set_onnx_metadata(model, meta: dict) -> None:
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)


def _quantize_onnx_graph(src: Path, dst: Path) -> None:
    """ONNX Runtime dynamic int8 quantisation of the MatMuls with constant weights (the Linear layers of the
    blocks); attention's activation-by-activation MatMuls and the classifier (a Gemm) stay float.

    Weights use 7 bits (reduce_range): on x86 CPUs without VNNI (AVX2 only) the u8 x s8 kernels add pairs of
    products in 16 bits and saturate on 8-bit weights (logit cosine with fp32 0.962 on hieradet_d_small, Zen 3),
    where 7 bits give 0.9997 and run 1.2x faster. torch's dynamic Linear avoids it likewise (7-bit activations)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    constants = {init.name for init in model.graph.initializer}
    linear = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constants]
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=linear,
        reduce_range=True,
    )


def quantize_onnx(src: str | Path, dst: str | Path) -> Path:
    """int8-quantise a float32 ONNX file that hierax exported, keeping its metadata (no second export)."""
    import onnx

    src, dst = Path(src), Path(dst)
    info, options = read_export_metadata(src)
    if options.get("quantize"):
        raise HieraxError(f"{src} is already quantised ({options['quantize']})")
    with tempfile.TemporaryDirectory(prefix="hierax-onnx-") as tmpdir:
        quantized = Path(tmpdir) / "model.int8.onnx"
        _quantize_onnx_graph(src, quantized)
        model = onnx.load(str(quantized))
    _set_onnx_metadata(model, _metadata(info, {**options, "quantize": "int8"}))
    atomic_write(dst, lambda tmp: onnx.save(model, tmp))
    return dst


def read_export_metadata(path: str | Path) -> tuple[ModelInfo, dict]:
    """The ModelInfo and export options stored inside an exported .onnx, .ts or .pt2 file."""
    path = Path(path)
    fmt = format_for_path(path)
    if not path.is_file():
        raise CheckpointError(f"exported model not found: {path}")
    try:
        if fmt == "onnx":
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            raw = {p.key: p.value for p in model.metadata_props}
            meta = {k: v if k in ("network", "task", "version") else json.loads(v) for k, v in raw.items()}
        elif fmt in ("torchscript", "pt2"):
            meta = json.loads(_extra_file(path, fmt))
        else:
            raise HieraxError(f"{path} is a checkpoint, not an exported graph: load it with load_pretrained_model")
    except (OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable {fmt} file: {err}") from None
    return _info_from_metadata(meta, fmt), meta.get("export", {})


def _extra_file(path: Path, fmt: str) -> str:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            parts = name.split("/")
            if parts[-1] == METADATA_FILE and parts[-2] in ("extra", "extras"):
                return archive.read(name).decode()
    raise CheckpointError(f"{path} has no {METADATA_FILE}: it was not exported by hierax")


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
        import onnx
        import onnxruntime as ort

        super().__init__(info, options, device)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise HieraxError("onnxruntime has no CUDA provider here: install onnxruntime-gpu or use device cpu")
            providers.insert(0, "CUDAExecutionProvider")
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = num_threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), session_options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self._read_classifier(onnx.load(str(path)))

    def _read_classifier(self, model) -> None:
        from onnx import numpy_helper

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
    fmt = options.get("format") or format_for_path(path)
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


BACKENDS = {"torch": None, "onnxruntime": "onnx", "torchscript": "torchscript"}


def load_with_backend(
    model: str | Path,
    backend: str,
    *,
    device: str | torch.device | None = None,
    size: tuple[int, int] | None = None,
) -> tuple[nn.Module | ExportedRunner, ModelInfo]:
    """Load `model` (a registry name, checkpoint or exported file) to run on `backend`: torch, onnxruntime or
    torchscript. A checkpoint or name is exported once (ONNX with dynamic batch and size; TorchScript at its
    input size) into `$HIERAX_HOME/exports`, keyed by the source file, its size and time, and the input size."""
    from hierax.weights.download import cache_dir
    from hierax.weights.load import EXPORTED_SUFFIXES, load_pretrained_model, resolve_file

    if backend not in BACKENDS:
        raise HieraxError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}")
    fmt = BACKENDS[backend]
    if fmt is None or Path(model).suffix in EXPORTED_SUFFIXES:
        if fmt is not None and format_for_path(model) != fmt:
            raise HieraxError(f"{model} is a {format_for_path(model)} file; backend {backend} runs {fmt} files")
        return load_pretrained_model(model, inference=True, device=device, new_size=size)
    source, _ = resolve_file(model)
    net, info = load_pretrained_model(source, inference=True, new_size=size)
    stat = source.stat()
    key = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{info.size}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = cache_dir().parent / "exports" / f"{source.stem}-{info.size[0]}x{info.size[1]}-{digest}{FORMATS[fmt]}"
    if not target.is_file():
        logger.info("Exporting %s for %s once, to %s", source.name, backend, target)
        export_model(net, info, target, dynamic_batch=True, dynamic_size=fmt == "onnx")
    runner, exported_info = load_exported(target, device=device)
    return runner, exported_info.with_size(info.size)
