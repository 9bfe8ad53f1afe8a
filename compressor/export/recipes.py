"""The quantization recipes, registered by name (as timm registers models): register_recipe adds one, get_recipe looks
one up (an unknown name is a CompressError with a did-you-mean), list_recipes names them. An "auto" recipe
(AUTO_CANDIDATES) names several: every candidate is built, measured on this CPU, and the fastest within the accuracy
tolerance wins (see quantize.auto_candidates)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CompressError, did_you_mean


@dataclass(frozen=True)
class Recipe:
    """One quantization flavour: static INT8 Q/DQ (calibrated), dynamic INT8 (weights ahead of time, activations at
    run time) or FP16; activation/weight types and ORT extra options for the INT8 kinds."""

    name: str
    description: str
    kind: str = "static"  # static | dynamic | fp16
    activation: str = "s8"  # "s8" | "u8" (static only)
    weight: str = "s8"
    extra: dict = field(default_factory=dict)
    reduce_range: bool = False
    float_stem: bool = False  # keep convolutions that read ≤ STEM_CHANNELS input channels in float

    @property
    def precision(self) -> str:
        return "fp16" if self.kind == "fp16" else "int8"


_RECIPES: dict[str, Recipe] = {}
# "auto" recipes: every candidate is built, measured on this CPU, and the fastest within the accuracy tolerance wins.
AUTO_CANDIDATES = {"cpu-auto": ("cpu-u8s8", "cpu-u8s8-float-stem", "cpu-s8s8", "cpu-u8s8-reduced", "cpu-dynamic", "cpu-dynamic-reduced")}


def register_recipe(name: str, description: str, **options) -> Recipe:
    """Register the recipe `name` (options: the other Recipe fields) and return it; a name is registered once."""
    if name in _RECIPES or name in AUTO_CANDIDATES:
        raise ValueError(f"quantization recipe '{name}' is already registered")
    recipe = Recipe(name, description, **options)
    _RECIPES[name] = recipe
    return recipe


def list_recipes(precision: str | None = None) -> list[str]:
    """The registered recipe names (of one precision, "int8" or "fp16", if given), sorted; the auto recipes last."""
    names = sorted(n for n, r in _RECIPES.items() if precision in (None, r.precision))
    return names + (sorted(AUTO_CANDIDATES) if precision in (None, "int8") else [])


def get_recipe(name: str) -> Recipe:
    if name not in _RECIPES:
        raise CompressError(f"unknown quantization recipe '{name}'.{did_you_mean(name, list_recipes())}", hint=f"choose one of {', '.join(list_recipes())}")
    return _RECIPES[name]


register_recipe("tensorrt", "TensorRT explicit Q/DQ: symmetric s8 activations and per-channel s8 weights, zero point 0, float biases",
                activation="s8", extra={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
register_recipe("cpu-u8s8", "ONNX Runtime CPU: asymmetric u8 activations, symmetric s8 weights (fast with VNNI)", activation="u8")
register_recipe("cpu-u8s8-float-stem", "cpu-u8s8 with the stem convolution (≤4 input channels, e.g. the image itself) kept in float: "
                "too few channels for the INT8 GEMM, and one Q/DQ boundary fewer", activation="u8", float_stem=True)
register_recipe("cpu-s8s8", "ONNX Runtime CPU: symmetric s8 activations and weights", activation="s8",
                extra={"ActivationSymmetric": True, "WeightSymmetric": True})
register_recipe("cpu-u8s8-reduced", "u8 activations with 7-bit weights, for CPUs without VNNI (avoids u8×s8 saturation)", activation="u8",
                reduce_range=True)
register_recipe("cpu-dynamic", "ONNX Runtime dynamic INT8: s8 weights quantized ahead of time, activations at run time, no calibration "
                "(for models dominated by MatMul/Gemm)", kind="dynamic")
register_recipe("cpu-dynamic-reduced", "cpu-dynamic with 7-bit weights, for CPUs without VNNI (avoids u8×s8 saturation)", kind="dynamic",
                reduce_range=True)
register_recipe("fp16", "FP16 weights and activations (graph inputs and outputs kept FP32 unless asked otherwise)", kind="fp16")
