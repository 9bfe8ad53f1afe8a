"""INT8 recipes over ONNX Runtime's static quantization (Q/DQ), calibrated on the user's own rows."""
from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._io import atomic_path
from ..errors import CompressError, did_you_mean


@dataclass(frozen=True)
class Recipe:
    """One INT8 flavour: activation/weight types and ORT extra options."""

    name: str
    description: str
    activation: str  # "s8" | "u8"
    weight: str = "s8"
    extra: dict = field(default_factory=dict)
    reduce_range: bool = False


_RECIPES = {
    r.name: r
    for r in (
        Recipe("tensorrt", "TensorRT explicit Q/DQ: symmetric s8 activations and per-channel s8 weights, zero point 0, float biases",
               "s8", extra={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}),
        Recipe("cpu-u8s8", "ONNX Runtime CPU: asymmetric u8 activations, symmetric s8 weights (fast with VNNI)", "u8"),
        Recipe("cpu-s8s8", "ONNX Runtime CPU: symmetric s8 activations and weights", "s8",
               extra={"ActivationSymmetric": True, "WeightSymmetric": True}),
        Recipe("cpu-u8s8-reduced", "u8 activations with 7-bit weights, for CPUs without VNNI (avoids u8×s8 saturation)", "u8",
               reduce_range=True),
    )
}
AUTO_CANDIDATES = {"cpu-auto": ("cpu-u8s8", "cpu-s8s8", "cpu-u8s8-reduced")}


def list_recipes() -> list[str]:
    return sorted(_RECIPES) + sorted(AUTO_CANDIDATES)


def get_recipe(name: str) -> Recipe:
    if name not in _RECIPES:
        raise CompressError(f"unknown quantization recipe '{name}'.{did_you_mean(name, list_recipes())}", hint=f"choose one of {', '.join(list_recipes())}")
    return _RECIPES[name]


class _Reader:
    """CalibrationDataReader over rows of real data, one row per call (batch 1, as the model will run), in the
    model input's own dtype (float32 features, or int64 token ids for a model that starts with an embedding)."""

    def __init__(self, input_name: str, rows: np.ndarray, dtype=None):
        self.input_name, self.i = input_name, 0
        self.rows = np.ascontiguousarray(rows, dtype=dtype) if dtype is not None else rows

    def get_next(self):
        if self.i >= len(self.rows):
            return None
        self.i += 1
        return {self.input_name: self.rows[self.i - 1:self.i]}

    def rewind(self):
        self.i = 0


def preprocess(fp32: Path, out: Path) -> None:
    """ORT's quant_pre_process: symbolic shape inference and graph optimisation before quantization."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32), str(out), skip_symbolic_shape=False)
    except Exception:
        quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)


# When quantizing every op ONNX Runtime knows fails, the second try quantizes only these (the weight-heavy ones)
# and leaves the rest in float; the result says so.
CORE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Ops worth reporting as INT8 or float: the ones that carry weights or most of the arithmetic (a Gather only when it
# looks rows up in a weight table, i.e. an embedding; Gathers on shapes are bookkeeping).
_COMPUTE_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Gather", "GatherElements", "EmbedLayerNormalization", "Attention",
                "MultiHeadAttention", "LayerNormalization", "BatchNormalization", "InstanceNormalization", "Softmax",
                "LSTM", "GRU", "RNN", "Einsum"}


@contextlib.contextmanager
def _quiet_root_logger():
    """ORT's quantizer warns through the root logger (e.g. per-channel axes on LayerNorm weights, which it then quantizes
    per tensor); keep that off the terminal, where the CLI promises one line per problem."""
    root = logging.getLogger()
    old_level, null = root.level, logging.NullHandler()
    root.addHandler(null)  # logging.warning() would otherwise install a stderr handler for good
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(old_level)
        root.removeHandler(null)


def quantize_static(fp32_pre: Path, out: Path, recipe: Recipe, calib: np.ndarray, method: str = "minmax", per_channel: bool = True) -> dict:
    """Static INT8 Q/DQ quantization of fp32_pre into out (atomically). Calibration rows are fed in the model input's
    dtype (int64 token ids stay integers). Returns {"fallback": None | why only CORE_OPS were quantized}."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise CompressError(f"unknown calibration method '{method}'.{did_you_mean(method, methods)}")
    types = {"s8": QuantType.QInt8, "u8": QuantType.QUInt8}
    import onnx

    graph_input = onnx.load(str(fp32_pre), load_external_data=False).graph.input[0]
    input_name = graph_input.name
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)
    except Exception:
        dtype = None

    def run(op_types):
        with atomic_path(out) as tmp, _quiet_root_logger():
            ort_quantize_static(
                str(fp32_pre), str(tmp), _Reader(input_name, calib, dtype),
                quant_format=QuantFormat.QDQ, activation_type=types[recipe.activation], weight_type=types[recipe.weight],
                per_channel=per_channel, reduce_range=recipe.reduce_range, calibrate_method=methods[method],
                extra_options=dict(recipe.extra), op_types_to_quantize=op_types,
            )

    try:
        run(None)
        return {"fallback": None}
    except CompressError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    try:  # some op could not be quantized: keep everything but the core ops in float, and say so
        run(list(CORE_OPS))
    except CompressError:
        raise
    except Exception as exc:
        raise CompressError(f"INT8 quantization ({recipe.name}) failed: {first}; quantizing only {', '.join(CORE_OPS)} "
                            f"failed too: {str(exc).splitlines()[0][:200]}", kind="runtime") from exc
    return {"fallback": f"quantizing every supported op failed ({first}); only {', '.join(CORE_OPS)} were quantized, the rest stays float"}


def qdq_summary(path: Path) -> dict:
    """Which compute ops of a Q/DQ model run between quantize/dequantize pairs (INT8) and which stay float:
    {"int8": {op: count}, "float": {op: count}}."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    produced_by = {o: n.op_type for n in g.node for o in n.output}
    weights = {t.name for t in g.initializer}
    int8, flt = {}, {}
    for n in g.node:
        if n.op_type not in _COMPUTE_OPS:
            continue
        if n.op_type.startswith("Gather") and not (n.input and (n.input[0] in weights or produced_by.get(n.input[0]) == "DequantizeLinear")):
            continue  # a Gather on shapes or activations, not a table lookup
        side = int8 if any(produced_by.get(i) == "DequantizeLinear" for i in n.input) else flt
        side[n.op_type] = side.get(n.op_type, 0) + 1
    return {"int8": dict(sorted(int8.items())), "float": dict(sorted(flt.items()))}


def scratch_dir(run_dir: Path) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=".quantize-", dir=run_dir)
