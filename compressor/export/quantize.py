"""INT8 recipes over ONNX Runtime's static quantization (Q/DQ), calibrated on the user's own rows."""
from __future__ import annotations

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
    """CalibrationDataReader over rows of real data, one row per call (batch 1, as the model will run)."""

    def __init__(self, input_name: str, rows: np.ndarray):
        self.input_name, self.rows, self.i = input_name, rows, 0

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


def quantize_static(fp32_pre: Path, out: Path, recipe: Recipe, calib: np.ndarray, method: str = "minmax", per_channel: bool = True) -> None:
    """Static INT8 Q/DQ quantization of fp32_pre into out (atomically)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise CompressError(f"unknown calibration method '{method}'.{did_you_mean(method, methods)}")
    types = {"s8": QuantType.QInt8, "u8": QuantType.QUInt8}
    import onnx

    input_name = onnx.load(str(fp32_pre), load_external_data=False).graph.input[0].name
    with atomic_path(out) as tmp:
        try:
            ort_quantize_static(
                str(fp32_pre), str(tmp), _Reader(input_name, calib),
                quant_format=QuantFormat.QDQ, activation_type=types[recipe.activation], weight_type=types[recipe.weight],
                per_channel=per_channel, reduce_range=recipe.reduce_range, calibrate_method=methods[method],
                extra_options=dict(recipe.extra),
            )
        except CompressError:
            raise
        except Exception as exc:
            raise CompressError(f"INT8 quantization ({recipe.name}) failed: {str(exc).splitlines()[0][:300]}", kind="runtime") from exc


def scratch_dir(run_dir: Path) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=".quantize-", dir=run_dir)
