"""Write a model to ONNX, TorchScript, torch.export (.pt2) or safetensors, with its ModelInfo and the export
options inside the file (see hierax.export.metadata; no sidecar files).

ONNX, TorchScript and .pt2 files hold a graph with two outputs, `logits` and `embedding`. ONNX and .pt2 exports
may have a dynamic batch and a dynamic height and width (the network takes any size). TorchScript is traced,
which fixes the input size (the batch may still be dynamic). Optional int8 dynamic quantisation replaces the
Linear layers of the blocks by int8 ones (weights per tensor, activations quantised on the fly); the classifier
stays float."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from hierax.atomic import atomic_write
from hierax.errors import HieraxError
from hierax.export.metadata import DTYPES, METADATA_FILE, export_metadata, read_export_metadata, set_onnx_metadata
from hierax.models.fastpath import has_vnni, to_plain
from hierax.weights.files import ModelInfo, write_checkpoint
from hierax.weights.formats import EXPORT_FORMATS, export_format_for

logger = logging.getLogger(__name__)

QUANTIZE_FORMATS = ("onnx", "torchscript")
# onnxscript's optimiser and onnx_ir log every pass at INFO: about 300 lines for one export.
_CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


class _TwoOutputs(nn.Module):
    """The graph that gets exported: image batch -> (logits, embedding)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.net.embedding(x)
        return self.net.classify(emb), emb


@contextlib.contextmanager
def _quiet_onnx_passes() -> Iterator[None]:
    """Hold the ONNX exporter's loggers at WARNING for one export (restored after), unless hierax's own logger
    is at DEBUG (`hierax -v`), where their pass-by-pass notes may help."""
    if logging.getLogger("hierax").isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.getEffectiveLevel() < logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ONNX Runtime's quantiser advises running its pre-processing (shape inference, graph fusions) first.
_PRE_PROCESSING_ADVICE = "Please consider to run pre-processing"


def _drop_quantizer_notes(record: logging.LogRecord) -> bool:
    """ONNX Runtime's quantiser logs one INFO line per tensor on the root logger (about 100 an export), and a
    warning to pre-process the graph first, which on these graphs changes a handful of nodes and neither speed nor
    agreement (benchmarks/README.md, int8): both are dropped; its other warnings pass."""
    if "onnxruntime" not in record.pathname:
        return True
    return record.levelno >= logging.WARNING and not record.getMessage().startswith(_PRE_PROCESSING_ADVICE)


def quantize_linear_int8(net: nn.Module) -> nn.Module:
    """A copy of `net` whose block Linear layers are int8 dynamically quantised (the classifier stays float)."""
    quantized = to_plain(copy.deepcopy(net).eval())  # torch's quantiser matches exact nn.Linear types
    quantized.body = torch.ao.quantization.quantize_dynamic(quantized.body, {nn.Linear}, dtype=torch.qint8)
    return quantized


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
    int8_weight_bits: int | None = None,
) -> Path:
    """Write `net` (with `info` inside the file) to `path` in format `fmt` (default: from the suffix).

    The example input has the signature's size (info.size). An ONNX int8 file's weights have `int8_weight_bits`
    (7 or 8; default: 8 on a CPU with VNNI, else 7). Returns the path written (atomically)."""
    path = Path(path)
    if not isinstance(net, nn.Module):
        raise HieraxError("export starts from a checkpoint (.pt, .safetensors) or a registered name, not an export")
    fmt = fmt or export_format_for(path)
    if fmt not in EXPORT_FORMATS:
        raise HieraxError(f"unknown export format '{fmt}': choose one of {', '.join(EXPORT_FORMATS)}")
    if dtype not in DTYPES:
        raise HieraxError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    if quantize not in (None, "int8"):
        raise HieraxError(f"unknown quantisation '{quantize}': the only choice is int8")
    if quantize and fmt not in QUANTIZE_FORMATS:
        raise HieraxError(f"int8 quantisation is available for {' and '.join(QUANTIZE_FORMATS)}, not {fmt}")
    if int8_weight_bits is not None and not (quantize and fmt == "onnx"):
        raise HieraxError("int8 weight bits are for ONNX int8 exports (--quantize int8, an .onnx file)")
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
    if quantize and fmt == "onnx":
        options["int8_weight_bits"] = _check_weight_bits(int8_weight_bits)
    options.update(dynamic_batch=dynamic_batch, dynamic_size=dynamic_size)
    if fmt == "pt2" and dynamic_size:
        options.update(size_multiple=PT2_SIZE_MULTIPLE, min_side=PT2_MIN_SIDE)
    meta = export_metadata(info, options)
    net = copy.deepcopy(net).to("cpu", DTYPES[dtype])
    if quantize and fmt == "torchscript":
        net = quantize_linear_int8(net)
    wrapper = _TwoOutputs(net).eval()
    # A batch of 2 keeps a dynamic batch from being specialised to 1.
    example = torch.randn(2 if dynamic_batch else 1, 3, *info.size, dtype=DTYPES[dtype])
    logger.info("Exporting %s to %s (%s, %s)", info.network, path, fmt, dtype)
    files = {METADATA_FILE: json.dumps(meta)}
    with torch.no_grad(), warnings.catch_warnings(), _quiet_onnx_passes():
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
    import onnx  # an optional dependency (the onnx extra), needed only for ONNX files

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
            _quantize_onnx_graph(plain, quantized, meta["export"]["int8_weight_bits"])
            plain = quantized
        model = onnx.load(str(plain))
    set_onnx_metadata(model, meta)
    onnx.save(model, out)


def int8_weight_bits() -> int:
    """The bits of an ONNX int8 file's weights when none are asked for: 8 on a CPU with VNNI, else 7.

    On x86 CPUs without VNNI (AVX2 only) ONNX Runtime's u8 x s8 kernels add pairs of products in 16 bits and
    saturate on 8-bit weights; 7 bits (reduce_range) avoid it. With VNNI, 8 bits keep the network closer to fp32
    at the same speed (figures in benchmarks/README.md, int8). The choice is written into the file, and loading an
    8-bit file on a CPU without VNNI warns."""
    return 8 if has_vnni() else 7


def _quantize_onnx_graph(src: Path, dst: Path, weight_bits: int) -> None:
    """ONNX Runtime dynamic int8 quantisation of the MatMuls with constant weights (the Linear layers of the
    blocks), weights in `weight_bits` (7 or 8); attention's activation-by-activation MatMuls and the classifier
    (a Gemm) stay float. torch's dynamic Linear avoids the saturation with 7-bit activations instead."""
    import onnx  # optional dependencies (the onnx extra), needed only for ONNX files
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    constants = {init.name for init in model.graph.initializer}
    linear = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constants]
    root = logging.getLogger()
    quiet = not logging.getLogger("hierax").isEnabledFor(logging.DEBUG)
    if quiet:
        root.addFilter(_drop_quantizer_notes)
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=linear,
            reduce_range=weight_bits == 7,
        )
    finally:
        root.removeFilter(_drop_quantizer_notes)


def _check_weight_bits(weight_bits: int | None) -> int:
    bits = int8_weight_bits() if weight_bits is None else weight_bits
    if bits not in (7, 8):
        raise HieraxError(f"int8 weights have 7 or 8 bits, not {bits}")
    return bits


def quantize_onnx(src: str | Path, dst: str | Path, weight_bits: int | None = None) -> Path:
    """int8-quantise a float32 ONNX file that hierax exported, keeping its metadata (no second export); weights
    in `weight_bits` (default: `int8_weight_bits()`)."""
    import onnx  # an optional dependency (the onnx extra), needed only for ONNX files

    src, dst = Path(src), Path(dst)
    bits = _check_weight_bits(weight_bits)
    info, options = read_export_metadata(src)
    if options.get("quantize"):
        raise HieraxError(f"{src} is already quantised ({options['quantize']})")
    with tempfile.TemporaryDirectory(prefix="hierax-onnx-") as tmpdir:
        quantized = Path(tmpdir) / "model.int8.onnx"
        _quantize_onnx_graph(src, quantized, bits)
        model = onnx.load(str(quantized))
    set_onnx_metadata(model, export_metadata(info, {**options, "quantize": "int8", "int8_weight_bits": bits}))
    atomic_write(dst, lambda tmp: onnx.save(model, tmp))
    return dst
