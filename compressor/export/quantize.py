"""INT8 recipes over ONNX Runtime's static quantization (Q/DQ), calibrated on the user's own rows."""
from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .._io import atomic_path
from ..errors import CompressError, did_you_mean
# the recipes live in .recipes; re-exported here, where callers have always imported them from
from .recipes import AUTO_CANDIDATES, Recipe, get_recipe, list_recipes, register_recipe  # noqa: F401

STEM_CHANNELS = 4


def stem_convs(model) -> list[str]:
    """Names of the ordinary (group 1) convolutions that read at most STEM_CHANNELS input channels: with a reduction
    of C_in × k × k ≤ 36 they are too thin for the INT8 GEMM kernels to beat float."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if n.op_type == "Conv" and group == 1 and len(n.input) > 1 and n.input[1] in inits and inits[n.input[1]].dims[1] <= STEM_CHANNELS:
            out.append(n.name)
    return out


def auto_candidates(name: str, fp32: Path, vnni: bool) -> list[str]:
    """The recipes to try for a requested INT8 recipe on this CPU and model: u8×s8 with reduced range only where the
    CPU lacks VNNI (where u8×s8 can saturate), dynamic INT8 only for models without convolutions (MatMul/Gemm-bound)."""
    if name not in AUTO_CANDIDATES:
        if get_recipe(name).precision != "int8":
            raise CompressError(f"'{name}' is not an INT8 recipe", hint=f"choose one of {', '.join(list_recipes('int8'))}")
        return [name]
    import onnx

    model = onnx.load(str(fp32), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    out = list(AUTO_CANDIDATES[name])
    if vnni:
        out.remove("cpu-u8s8-reduced")
        out.remove("cpu-dynamic-reduced")
    if not stem_convs(model):
        out.remove("cpu-u8s8-float-stem")
    if ops & {"Conv", "ConvTranspose"} or not ops & {"MatMul", "Gemm"}:
        out = [r for r in out if get_recipe(r).kind != "dynamic"]
    return out


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

    import onnx

    try:
        quant_pre_process(str(fp32), str(out), skip_symbolic_shape=False)
    except Exception:
        quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)
    model = onnx.load(str(out))
    unnamed = [n for n in model.graph.node if not n.name]
    if unnamed:  # nodes are kept in float, ranked and reported by name: every node needs one
        taken = {n.name for n in model.graph.node}
        for i, n in enumerate(unnamed):
            n.name = next(c for c in (f"{n.op_type}_{i}", f"{n.op_type}_{i}_{len(taken)}") if c not in taken)
            taken.add(n.name)
        onnx.save(model, str(out))


# When quantizing every op ONNX Runtime knows fails, the second try quantizes only these (the weight-heavy ones)
# and leaves the rest in float; the result says so.
CORE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Ops worth reporting as INT8 or float: the ones that carry weights or most of the arithmetic (a Gather only when it
# looks rows up in a weight table, i.e. an embedding; Gathers on shapes are bookkeeping).
_COMPUTE_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Gather", "GatherElements", "EmbedLayerNormalization", "Attention",
                "MultiHeadAttention", "LayerNormalization", "BatchNormalization", "InstanceNormalization", "Softmax",
                "LSTM", "GRU", "RNN", "Einsum"}


_INTEGER_OPS = {"MatMulInteger": "MatMul", "ConvInteger": "Conv", "DynamicQuantizeMatMul": "MatMul", "QLinearMatMul": "MatMul",
                "QLinearConv": "Conv", "QGemm": "Gemm"}


# Entropy calibration searches for the clipping threshold among num_bins / num_quantized_bins candidates.
# quantize_static builds its calibrator with 128 and 128, which leaves one candidate, the full range: "entropy" would
# be minmax under another name. These are the values TensorRT's entropy calibrator uses (2048 bins, 128 levels).
ENTROPY_BINS = {"num_bins": 2048, "num_quantized_bins": 128}


@contextlib.contextmanager
def _histogram_bins(method: str):
    """Give ONNX Runtime's entropy calibrator real histogram bins (quantize_static passes no way to set them)."""
    import importlib

    ortq = importlib.import_module("onnxruntime.quantization.quantize")  # the module (the package re-exports a function of that name)
    original = getattr(ortq, "create_calibrator", None)
    if method != "entropy" or original is None:
        yield
        return

    def create_calibrator(*args, extra_options=None, **kwargs):
        return original(*args, extra_options={**ENTROPY_BINS, **(extra_options or {})}, **kwargs)

    ortq.create_calibrator = create_calibrator
    try:
        yield
    finally:
        ortq.create_calibrator = original


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


def quantize_static(fp32_pre: Path, out: Path, recipe: Recipe, calib: np.ndarray, method: str = "minmax", per_channel: bool = True,
                    exclude: list[str] | None = None) -> dict:
    """Static INT8 Q/DQ quantization of fp32_pre into out (atomically), the nodes named in exclude left in float.
    Calibration rows are fed in the model input's dtype (int64 token ids stay integers).
    Returns {"fallback": None | why only CORE_OPS were quantized}."""
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
        with atomic_path(out) as tmp, _quiet_root_logger(), _histogram_bins(method):
            ort_quantize_static(
                str(fp32_pre), str(tmp), _Reader(input_name, calib, dtype),
                quant_format=QuantFormat.QDQ, activation_type=types[recipe.activation], weight_type=types[recipe.weight],
                per_channel=per_channel, reduce_range=recipe.reduce_range, calibrate_method=methods[method],
                extra_options=dict(recipe.extra), op_types_to_quantize=op_types, nodes_to_exclude=list(exclude or []),
            )

    if recipe.float_stem:
        exclude = list(exclude or []) + [n for n in stem_convs(onnx.load(str(fp32_pre), load_external_data=False)) if n not in (exclude or [])]
    if exclude:
        exclude = _with_passthrough_producers(fp32_pre, exclude)
    try:
        run(None)
        if exclude:
            _float_inputs(out, exclude)
        return {"fallback": None}
    except CompressError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    try:  # some op could not be quantized: keep everything but the core ops in float, and say so
        run(list(CORE_OPS))
        if exclude:
            _float_inputs(out, exclude)
    except CompressError:
        raise
    except Exception as exc:
        raise CompressError(f"INT8 quantization ({recipe.name}) failed: {first}; quantizing only {', '.join(CORE_OPS)} "
                            f"failed too: {str(exc).splitlines()[0][:200]}", kind="runtime") from exc
    return {"fallback": f"quantizing every supported op failed ({first}); only {', '.join(CORE_OPS)} were quantized, the rest stays float"}


# Ops that pass values through (or clip them) between compute nodes: ONNX Runtime's Q/DQ quantizer folds a Relu into
# the quantized output of its producer, so keeping a node in float means keeping these upstream of it in float too.
_PASSTHROUGH = {"Relu", "Clip", "LeakyRelu", "HardSigmoid", "Sigmoid", "Tanh", "MaxPool", "Reshape", "Flatten", "Transpose",
                "Squeeze", "Unsqueeze", "Identity"}


def _with_passthrough_producers(fp32_pre: Path, names: list[str]) -> list[str]:
    import onnx

    g = onnx.load(str(fp32_pre), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    by_name = {n.name: n for n in g.node}
    out, todo = list(dict.fromkeys(names)), list(names)
    while todo:
        n = by_name.get(todo.pop())
        for i in (n.input if n is not None else []):
            p = producer.get(i)
            if p is not None and p.op_type in _PASSTHROUGH and p.name not in out:
                out.append(p.name)
                todo.append(p.name)
    return out


def _float_inputs(path: Path, names: list[str]) -> None:
    """Make the named nodes read their activations in float: an input that comes through QuantizeLinear ->
    DequantizeLinear is rewired to the tensor before the pair, and pairs nothing else reads are removed. (Excluding a
    node from ORT's quantizer keeps its weights float, but its producer may still quantize the tensor it reads.)"""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    keep = set(names)
    for n in g.node:
        if n.name not in keep:
            continue
        for k, t in enumerate(n.input):
            dq = producer.get(t)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                n.input[k] = q.input[0]
    for _ in range(2):  # DequantizeLinear nodes nobody reads, then the QuantizeLinear nodes that fed them
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in used for o in n.output)]
        for n in dead:
            g.node.remove(n)
    onnx.save(model, str(path))


def quantize_dynamic(fp32_pre: Path, out: Path, recipe: Recipe, per_channel: bool = True, exclude: list[str] | None = None) -> dict:
    """Dynamic INT8: MatMul/Gemm weights quantized ahead of time, activations quantized per batch at run time."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    try:
        with atomic_path(out) as tmp, _quiet_root_logger():
            ort_quantize_dynamic(str(fp32_pre), str(tmp), per_channel=per_channel, reduce_range=recipe.reduce_range,
                                 weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude or []), op_types_to_quantize=["MatMul", "Gemm"])
    except CompressError:
        raise
    except Exception as exc:
        raise CompressError(f"dynamic INT8 quantization failed: {str(exc).splitlines()[0][:300]}", kind="runtime") from exc
    return {"fallback": None}


def to_fp16(fp32: Path, out: Path, keep_io_fp32: bool = True) -> dict:
    """FP16 weights and activations with ONNX Runtime's converter; graph inputs/outputs stay FP32 when keep_io_fp32
    (the caller feeds and reads float32 as before), with Casts at the edges."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        with warnings.catch_warnings(), _quiet_root_logger():
            warnings.simplefilter("ignore")
            model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=keep_io_fp32, disable_shape_infer=False)
        _topological_sort(model.graph)  # the converter appends the input Casts after their consumers
        onnx.checker.check_model(model)
    except Exception as exc:
        raise CompressError(f"FP16 conversion failed: {str(exc).splitlines()[0][:300]}", kind="runtime") from exc
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    return {"fallback": None, "keep_io_fp32": keep_io_fp32}


def _topological_sort(graph) -> None:
    """Reorder graph.node in place so every node comes after the producers of its inputs (Kahn's algorithm, stable)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            (ordered if all(i in ready for i in n.input) else rest).append(n)
            if ordered and ordered[-1] is n:
                ready.update(n.output)
        if len(rest) == len(pending):
            raise ValueError(f"the graph has a cycle or a missing input at node {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def quantize_with(recipe: Recipe, fp32: Path, fp32_pre: Path, out: Path, calib: np.ndarray, method: str = "minmax",
                  per_channel: bool = True, exclude: list[str] | None = None, keep_io_fp32: bool = True) -> dict:
    """Apply one recipe of any kind: static INT8 (calibrated on calib), dynamic INT8 or FP16 (from the unprocessed fp32)."""
    if recipe.kind == "fp16":
        return to_fp16(fp32, out, keep_io_fp32)
    if recipe.kind == "dynamic":
        return quantize_dynamic(fp32_pre, out, recipe, per_channel, exclude)
    info = quantize_static(fp32_pre, out, recipe, calib, method, per_channel, exclude)
    if recipe.name == "tensorrt":
        problems = check_tensorrt_qdq(out, float_nodes=set(exclude or ()))
        if problems:
            raise CompressError(f"the TensorRT INT8 graph breaks TensorRT's Q/DQ rules at {len(problems)} place(s), first: {problems[0]}",
                                kind="runtime")
    return info


_TRT_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def check_tensorrt_qdq(path_or_model, float_nodes=()) -> list[str]:
    """Walk a Q/DQ graph node by node against what TensorRT's explicit quantization takes: every Quantize/DequantizeLinear
    has a zero point that is int8 and 0 (symmetric, signed activations and weights); every Conv/ConvTranspose/Gemm/MatMul
    weight comes through a DequantizeLinear of an int8 initializer with per-channel scales along the output-channel axis;
    biases stay float initializers; no int32 (quantized) bias anywhere. Nodes named in float_nodes were kept in float on
    purpose and are not checked. Returns the violations (empty: the graph is fine)."""
    import onnx

    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    qdq = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:  # nothing quantized: a violation, unless nodes were kept in float on purpose (the search's last resort)
        return [] if float_nodes else ["the graph has no QuantizeLinear/DequantizeLinear nodes"]
    bad = [p for p in (_zero_point_problem(n, inits) for n in qdq) if p]
    for n in g.node:
        if n.op_type in _TRT_WEIGHTED_OPS and len(n.input) >= 2 and n.name not in float_nodes:
            bad += _weight_problems(n, producers, inits)
    bad += [f"initializer {t.name}: INT32 (a quantized bias)" for t in g.initializer if t.data_type == onnx.TensorProto.INT32]
    return bad


def _zero_point_problem(n, inits) -> str | None:
    """What is wrong with a Quantize/DequantizeLinear's zero point for TensorRT (a constant int8 0), or None."""
    import onnx
    from onnx import numpy_helper

    if len(n.input) < 3 or n.input[2] not in inits:
        return f"{n.op_type} {n.name}: no constant zero point"
    zp = inits[n.input[2]]
    if zp.data_type != onnx.TensorProto.INT8:
        return f"{n.op_type} {n.name}: zero point is {onnx.TensorProto.DataType.Name(zp.data_type)}, not INT8"
    if numpy_helper.to_array(zp).any():
        return f"{n.op_type} {n.name}: zero point is not 0 (asymmetric)"
    return None


def _weight_problems(n, producers, inits) -> list[str]:
    """What is wrong, for TensorRT, with the weight (and bias) of one Conv/ConvTranspose/Gemm/MatMul node."""
    import onnx

    dq = producers.get(n.input[1])
    is_dq = dq is not None and dq.op_type == "DequantizeLinear"
    q = producers.get(dq.input[0]) if is_dq else None
    float_weight = q is not None and q.op_type == "QuantizeLinear" and q.input[0] in inits  # float -> Q -> DQ, quantized at build time
    if not is_dq or (dq.input[0] not in inits and not float_weight):
        if n.input[1] in inits or (dq is not None and not is_dq):
            return [f"{n.op_type} {n.name}: weight {n.input[1]} is not quantized"]
        return []  # an activation × activation MatMul: both inputs come through Q/DQ pairs, checked with the zero points
    w = inits[q.input[0]] if float_weight else inits[dq.input[0]]
    bad = []
    if not float_weight and w.data_type != onnx.TensorProto.INT8:
        bad.append(f"{n.op_type} {n.name}: weight is {onnx.TensorProto.DataType.Name(w.data_type)}, not INT8")
    return bad + [p for p in (_per_channel_problem(n, dq, w, inits), _bias_problem(n, inits)) if p]


def _output_channel_axis(n, weight_rank: int) -> int:
    """The axis of a compute node's weight that indexes its output channels."""
    attrs = {a.name: a for a in n.attribute}
    if n.op_type == "Conv" or (n.op_type == "Gemm" and "transB" in attrs and attrs["transB"].i == 1):
        return 0
    if n.op_type == "ConvTranspose":
        return 1
    return weight_rank - 1  # MatMul, Gemm without transB: weight is (in, out)


def _per_channel_problem(n, dq, w, inits) -> str | None:
    """None when the weight's DequantizeLinear has one scale per output channel, along the output-channel axis."""
    from onnx import numpy_helper

    scale = numpy_helper.to_array(inits[dq.input[1]]) if dq.input[1] in inits else None
    out_axis = _output_channel_axis(n, len(w.dims))
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    axis = axis + len(w.dims) if axis < 0 else axis
    if scale is None or scale.ndim != 1 or axis != out_axis or len(scale) != w.dims[out_axis]:
        return f"{n.op_type} {n.name}: weight scales are not per output channel (axis {axis}, {None if scale is None else scale.shape})"
    return None


def _bias_problem(n, inits) -> str | None:
    """None unless a Conv/ConvTranspose/Gemm has a bias that is not a float initializer."""
    import onnx

    if n.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(n.input) <= 2 or not n.input[2]:
        return None
    b = n.input[2]
    if b not in inits or inits[b].data_type != onnx.TensorProto.FLOAT:
        return f"{n.op_type} {n.name}: bias {b} is not a float initializer"
    return None


def sensitivity(fp32_pre: Path, qpath: Path, rows: np.ndarray, emulate_qdq: bool = False) -> list[dict]:
    """Rank the compute nodes of a Q/DQ model by the error they add. Every tensor the two models share is read from the
    float model and from the quantized one on the same rows; a node's added error is the relative error of its output
    minus the largest relative error among the float tensors its quantized inputs came from. A node reading an activation
    with outliers (whose per-tensor scale crushes every other value) or with a badly quantized weight adds much; error
    merely carried from upstream adds none. Returns [{"node", "op", "added_error", "error"}], worst first."""
    import onnx

    fmodel = onnx.load(str(fp32_pre), load_external_data=False)
    qmodel = onnx.load(str(qpath), load_external_data=False)
    ftensors = {o for n in fmodel.graph.node for o in n.output if o} | {i.name for i in fmodel.graph.input}
    nodes = _QDQGraph(qmodel, ftensors).compute_nodes()
    wanted = sorted({out for _, out, _ in nodes} | {i for _, _, ins in nodes for i in ins})
    fvals = _tensor_values(fmodel, wanted, rows, emulate_qdq=False)
    qvals = _tensor_values(qmodel, wanted, rows, emulate_qdq=emulate_qdq)
    err = _relative_errors(wanted, fvals, qvals, fmodel, qmodel)
    ranked = [{"node": n.name, "op": _INTEGER_OPS.get(n.op_type, n.op_type), "error": err[out],
               "added_error": err[out] - max([err.get(i, 0.0) for i in ins] or [0.0])}
              for n, out, ins in nodes if out in err]
    return sorted(ranked, key=lambda r: -r["added_error"])


class _QDQGraph:
    """A quantized graph seen from the float one it was made from (whose tensor names are ftensors): where each
    compute node's inputs came from and where its output can be compared."""

    def __init__(self, qmodel, ftensors: set[str]):
        self.qmodel, self.fset = qmodel, ftensors
        self.producer = {o: n for n in qmodel.graph.node for o in n.output}
        self.consumers = {}
        for n in qmodel.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def source(self, t: str) -> str:
        """The float tensor a quantized input came from: back through DequantizeLinear <- QuantizeLinear."""
        dq = self.producer.get(t)
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = self.producer.get(dq.input[0])
            return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else ""  # a weight: no float tensor
        return t

    def landing(self, t: str) -> str:
        """Where a node's output can be compared: itself, or the DequantizeLinear after its QuantizeLinear."""
        if t in self.fset:
            return t
        for q in self.consumers.get(t, []):
            if q.op_type == "QuantizeLinear":
                for dq in self.consumers.get(q.output[0], []):
                    if dq.op_type == "DequantizeLinear" and dq.output[0] in self.fset:
                        return dq.output[0]
        return ""

    def compute_nodes(self) -> list[tuple]:
        """(node, its comparable output, the float tensors its inputs came from) for each compute node with an output to compare."""
        nodes = []
        for n in self.qmodel.graph.node:
            if n.op_type not in _COMPUTE_OPS and n.op_type not in _INTEGER_OPS:
                continue
            out = self.landing(n.output[0])
            ins = [self.source(i) for i in n.input if i]
            if out:
                nodes.append((n, out, [i for i in ins if i in self.fset]))
        return nodes


def _tensor_values(model, wanted: list[str], rows: np.ndarray, emulate_qdq: bool) -> dict:
    """{tensor: value} of the wanted tensors (and the input) of model on rows; the model gains them as graph outputs."""
    import onnx

    from .onnx_io import make_session

    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in wanted if t not in have and t not in {i.name for i in model.graph.input})
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.onnx"
        onnx.save(model, str(p))
        sess = make_session(p, threads=None, emulate_qdq=emulate_qdq)
        names = [o.name for o in sess.get_outputs()]
        feed = sess.get_inputs()[0].name
        vals = dict(zip(names, sess.run(names, {feed: rows})))
        vals.setdefault(feed, rows)
    return vals


def _relative_errors(wanted: list[str], fvals: dict, qvals: dict, fmodel, qmodel) -> dict[str, float]:
    """{tensor: ‖float − quantized‖ / ‖float‖} for the wanted tensors both models gave, of the same shape."""
    fop = {o: n.op_type for n in fmodel.graph.node for o in n.output}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    err = {}
    for t in wanted:
        if t in fvals and t in qvals:
            f, q = np.asarray(fvals[t], np.float64), np.asarray(qvals[t], np.float64)
            if fop.get(t) == "Relu" and producer.get(t) is not None and producer[t].op_type != "Relu":
                q = np.maximum(q, 0.0)  # the quantizer folded the Relu into the Q/DQ after it: the tensor is pre-Relu here
            if f.shape == q.shape and f.size:
                err[t] = float(np.linalg.norm(f - q) / (np.linalg.norm(f) + 1e-12))
    return err


def quantized_nodes(path: Path) -> dict[str, str]:
    """{node name: op type} of the compute nodes that run on Q/DQ inputs (what a tolerance search may keep in float)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    produced_by = {o: n.op_type for n in g.node for o in n.output}
    return {n.name: n.op_type for n in g.node if n.op_type in _COMPUTE_OPS | {"Add", "Mul", "Concat", "AveragePool", "MaxPool",
                                                                              "GlobalAveragePool", "Relu", "Sigmoid"}
            and any(produced_by.get(i) in ("DequantizeLinear", "DynamicQuantizeLinear") for i in n.input)
            or n.op_type in ("MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul")}


def qdq_summary(path: Path) -> dict:
    """Which compute ops of a Q/DQ model run between quantize/dequantize pairs (INT8) and which stay float:
    {"int8": {op: count}, "float": {op: count}}."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    produced_by = {o: n.op_type for n in g.node for o in n.output}
    weights = {t.name for t in g.initializer}
    int8, flt = {}, {}
    for n in g.node:
        if n.op_type in _INTEGER_OPS:  # dynamic INT8 (QOperator form): counted under the float op it replaced
            int8[_INTEGER_OPS[n.op_type]] = int8.get(_INTEGER_OPS[n.op_type], 0) + 1
            continue
        if n.op_type not in _COMPUTE_OPS:
            continue
        if n.op_type.startswith("Gather") and not (n.input and (n.input[0] in weights or produced_by.get(n.input[0]) == "DequantizeLinear")):
            continue  # a Gather on shapes or activations, not a table lookup
        side = int8 if any(produced_by.get(i) == "DequantizeLinear" for i in n.input) else flt
        side[n.op_type] = side.get(n.op_type, 0) + 1
    return {"int8": dict(sorted(int8.items())), "float": dict(sorted(flt.items()))}


def scratch_dir(run_dir: Path) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=".quantize-", dir=run_dir)
