"""Latency estimates for targets this host is not: a roofline over the model's layers.

Each compute layer of the ONNX graph (Conv, ConvTranspose, Gemm, MatMul) costs max(ops / (peak × e_c), bytes / (bandwidth × e_m))
plus a fixed per-layer cost, where ops = 2 × MACs at the batch size, bytes = weights at the precision plus input and
output activations, and e_c, e_m are efficiency factors (the fraction of the data-sheet peak a real engine reaches).
Elementwise layers are taken as fused into the compute layers (TensorRT fuses BatchNorm, activations and residual adds).
The per-layer cost is calibrated on one published measurement (MLPerf Inference Edge ResNet-50) and the method's error
is checked on another (benchmarks/results/roofline.md). Every figure it gives is labelled "estimated" and kept apart
from measured ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Per-layer cost calibrated in benchmarks/roofline_check.py on MLPerf Inference v3.0 Edge, ResNet-50 single-stream, Jetson AGX Orin
# (0.633 ms p90, INT8, GPU): see benchmarks/results/roofline.md for the fit and the error on Orin NX.
DEFAULT_COMPUTE_EFFICIENCY = 0.5  # assumed: half the data-sheet dense peak on convolutions
DEFAULT_MEMORY_EFFICIENCY = 0.7  # assumed: a typical sustained fraction of LPDDR5/HBM peak bandwidth
DEFAULT_LAYER_OVERHEAD_US = 5.2  # calibrated on AGX Orin (benchmarks/results/roofline.md): Orin NX predicted within 4%


# The profile figures a roofline estimate needs, per precision: the GPU's dense peak (TOPS or TFLOPS) and the bandwidth.
PEAK_KEYS = {"int8": "gpu_int8_dense_tops", "fp16": "gpu_fp16_dense_tflops", "fp32": "gpu_fp32_tflops"}


def _figure(hardware: dict, key: str) -> float | None:
    """A numeric profile figure, whether written bare or as {value = …, source = …}; None when absent or not published."""
    v = hardware.get(key)
    if isinstance(v, dict):
        v = v.get("value")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def roofline_figures(profile: dict, precision: str) -> dict | None:
    """{peak_tops, bandwidth_gbps} of a target profile for estimate() at this precision; None when it lacks either."""
    hw = profile.get("hardware") or {}
    peak, bw = _figure(hw, PEAK_KEYS.get(precision, "")), _figure(hw, "memory_bandwidth_gbps")
    return None if peak is None or bw is None else {"peak_tops": peak, "bandwidth_gbps": bw}


@dataclass
class Layer:
    name: str
    op: str
    macs: int
    weight_elems: int
    act_elems: int  # input + output activation elements


def _shape(vi) -> list[int] | None:
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return dims if dims and all(d is not None and d > 0 for d in dims) else None


def layers(onnx_path: str | Path, batch: int = 1) -> list[Layer]:
    """The layers of an FP32 ONNX model with their MACs, weight and activation element counts at this batch size."""
    model = _with_inferred_shapes(onnx_path, batch)
    shapes = {vi.name: _shape(vi) for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    return [_layer(n, shapes, inits) for n in model.graph.node]


def _with_inferred_shapes(onnx_path: str | Path, batch: int):
    """The model with its batch axis fixed to batch and every shape inferred."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    return onnx.shape_inference.infer_shapes(model)


def _layer(n, shapes: dict, inits: dict) -> Layer:
    """One node as a Layer: its MACs, weight elements (initializer inputs) and activation elements (other inputs and outputs)."""
    named = [i for i in n.input if i]
    ins = [shapes.get(i) or inits.get(i) for i in named]
    outs = [shapes.get(o) for o in n.output if o]
    act = sum(math.prod(s) for s, i in zip(ins, named) if s and i not in inits) + sum(math.prod(s) for s in outs if s)
    w = sum(math.prod(inits[i]) for i in n.input if i in inits)
    return Layer(n.name or n.op_type, n.op_type, int(_macs(n, ins, outs)), int(w), int(act))


def _macs(n, ins: list, outs: list) -> int:
    """Multiply-accumulates of a Conv/ConvTranspose/Gemm/MatMul node with known shapes; 0 for other nodes or unknown shapes."""
    if len(ins) < 2 or not ins[1] or not outs or not outs[0]:
        return 0
    if n.op_type == "Conv":  # every output element: (C_in / groups) × kernel MACs
        return math.prod(outs[0]) * math.prod(ins[1][1:])
    if n.op_type == "ConvTranspose":  # every input element scatters into (C_out / groups) × kernel outputs
        return math.prod(ins[0]) * math.prod(ins[1][1:]) if ins[0] else 0
    if n.op_type in ("Gemm", "MatMul") and ins[0]:
        trans_a = any(at.name == "transA" and at.i for at in n.attribute)
        return math.prod(outs[0]) * (ins[0][-2] if trans_a else ins[0][-1])
    return 0


def estimate(onnx_path: str | Path, hardware: dict, precision: str = "int8", batch: int = 1,
             compute_efficiency: float = DEFAULT_COMPUTE_EFFICIENCY, memory_efficiency: float = DEFAULT_MEMORY_EFFICIENCY,
             layer_overhead_us: float = DEFAULT_LAYER_OVERHEAD_US) -> dict:
    """Estimated latency (ms) of an FP32 ONNX model run at `precision` on a target whose hardware gives peak_tops
    (dense, at that precision) and bandwidth_gbps. Each compute layer costs the larger of its arithmetic time and its
    memory time, plus a fixed per-layer cost (kernel launch and synchronisation, which dominate small layers at batch 1);
    elementwise layers are taken as fused into them, as TensorRT does with BatchNorm/ReLU/residual adds."""
    peak = float(hardware["peak_tops"]) * 1e12  # ops/s
    bw = float(hardware["bandwidth_gbps"]) * 1e9  # bytes/s
    b = BYTES[precision]
    compute_s = memory_s = overhead_s = 0.0
    macs_total = bytes_total = n = 0
    for layer in layers(onnx_path, batch):
        if layer.op not in COMPUTE or not layer.macs:
            continue
        nbytes = (layer.weight_elems + layer.act_elems) * b
        t_cmp = 2 * layer.macs / (peak * compute_efficiency)
        t_mem = nbytes / (bw * memory_efficiency)
        if t_cmp >= t_mem:
            compute_s += t_cmp
        else:
            memory_s += t_mem
        overhead_s += layer_overhead_us * 1e-6
        macs_total += layer.macs
        bytes_total += nbytes
        n += 1
    total = compute_s + memory_s + overhead_s
    parts = {"compute": compute_s, "memory": memory_s, "per-layer overhead": overhead_s}
    return {"latency_ms": 1e3 * total, "macs": macs_total, "bytes": bytes_total, "layers": n, "precision": precision, "batch": batch,
            "bound": max(parts, key=parts.get), "compute_ms": 1e3 * compute_s, "memory_ms": 1e3 * memory_s, "overhead_ms": 1e3 * overhead_s,
            "compute_efficiency": compute_efficiency, "memory_efficiency": memory_efficiency, "layer_overhead_us": layer_overhead_us,
            "peak_tops": hardware["peak_tops"], "bandwidth_gbps": hardware["bandwidth_gbps"], "method": "roofline", "estimated": True}
