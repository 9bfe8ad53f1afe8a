"""TensorRT engines from the run's ONNX files (optional: pip install 'compressor[tensorrt]').

TensorRT is imported only when an engine is built, never with this module. The build itself lives in
runtime/trt_core.py, which the deploy bundle ships verbatim; this module adds what the package needs around it:
the graph's own precision read from the ONNX file, the target profile's TensorRT version, CompressError and an
atomic write."""
from __future__ import annotations

import logging
from pathlib import Path

from .._io import write_bytes
from ..errors import CompressError
from ..runtime import trt_core

log = logging.getLogger("compressor")


def compress_error(exc: Exception, kind: str = "runtime") -> CompressError:
    """trt_core's exceptions as CompressError: a missing TensorRT or GPU is the user's setup (exit 2)."""
    if isinstance(exc, trt_core.TensorRTUnavailable):
        return CompressError(exc.message, hint=exc.hint or None, kind="input")
    return CompressError(getattr(exc, "message", str(exc)), hint=getattr(exc, "hint", None) or None, kind=kind)


def graph_precision(onnx_path: str | Path) -> str:
    """'int8' for a Q/DQ graph, 'fp16' when it holds FP16 tensors or casts, else 'fp32'."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:
        raise CompressError(f"{onnx_path} is not a readable ONNX model: {str(exc).splitlines()[0][:200]}") from None
    ops = {n.op_type for n in model.graph.node}
    if {"QuantizeLinear", "DequantizeLinear"} & ops:
        return "int8"
    half = onnx.TensorProto.FLOAT16
    if any(t.data_type == half for t in model.graph.initializer) or any(
            n.op_type == "Cast" and any(a.name == "to" and a.i == half for a in n.attribute) for n in model.graph.node):
        return "fp16"
    return "fp32"


def plan_flags(precision: str, graph: str, *, trt_version: str | None = None, profile_version: str | None = None) -> dict:
    """The build plan (strongly typed or not, builder flags, trtexec flags) for the TensorRT that will build the engine.

    trt_version is the installed TensorRT's (it is the one that builds); profile_version, the target profile's
    runtime.version, is used when nothing is installed (a plan for the device) and otherwise only checked: an engine
    built by another major.minor than the target's will not load there."""
    version = trt_version or profile_version
    if not version:
        raise CompressError("no TensorRT version to plan the engine for: TensorRT is not installed and the target profile names none",
                            hint="install TensorRT, or add runtime.version to the target profile")
    try:
        plan = trt_core.choose_flags(version, precision, graph)
    except trt_core.EngineError as exc:
        raise compress_error(exc, kind="input") from None
    plan["tensorrt_version"] = str(version)
    if trt_version and profile_version and trt_core.parse_version(trt_version) != trt_core.parse_version(profile_version):
        plan["note"] = (f"built with TensorRT {trt_version} but the target runs {profile_version}: "
                        "the engine will not load there; build it on the device from the ONNX file (the deploy bundle does)")
    return plan


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, precision: str | None = None, target: dict | None = None,
                 batch: tuple[int, int, int] = (1, 1, 32)) -> dict:
    """Build a serialized TensorRT engine from an ONNX file (Q/DQ INT8, FP16 or FP32) and write it atomically.

    precision defaults to the graph's own (INT8 for a Q/DQ graph). Returns what was built: path, size, TensorRT
    version, flags."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise CompressError(f"ONNX model {onnx_path} does not exist")
    if not (1 <= batch[0] <= batch[1] <= batch[2]):
        raise CompressError(f"batch range {batch} must satisfy 1 <= min <= opt <= max")
    graph = graph_precision(onnx_path)
    precision = precision or graph
    try:
        trt = trt_core.import_tensorrt()
    except trt_core.TensorRTUnavailable as exc:
        raise compress_error(exc) from None
    profile_version = ((target or {}).get("runtime") or {}).get("version")
    plan = plan_flags(precision, graph, trt_version=str(trt.__version__), profile_version=profile_version)
    if plan.get("note"):
        log.warning(f"tensorrt: {plan['note']}")
    try:
        data, used = trt_core.build_serialized(onnx_path, precision, graph, batch=batch, trt=trt)
    except (trt_core.EngineError, trt_core.TensorRTUnavailable) as exc:
        raise compress_error(exc) from None
    write_bytes(engine_path, data)
    return {"engine": str(engine_path), "onnx": str(onnx_path), "size_bytes": len(data), "precision": precision, "graph": graph,
            **used, **({"note": plan["note"]} if plan.get("note") else {})}
