"""Quantization flavours (static Q/DQ recipes, dynamic INT8, FP16), the TensorRT node-by-node check, and the
accuracy-aware mode: on a student built with an outlier activation, plain INT8 misses the tolerance, keeping the
sensitive node in float brings it back, and quantization-aware distillation does when nothing may stay float."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from compressor import api
from compressor.config import BenchConfig, CompressConfig, DataConfig, DistillConfig, QuantizeConfig
from compressor.errors import CompressError
from compressor.export.onnx_io import compare, export_onnx, make_session, run_session
from compressor.export.quantize import (auto_candidates, check_tensorrt_qdq, get_recipe, list_recipes, preprocess, qdq_summary,
                                        quantize_with, sensitivity)

OUTLIER_SRC = '''
import math

import torch
import torch.nn as nn


class Outlier(nn.Module):
    """One hidden channel shifted by 1e4: a per-tensor INT8 range for that activation crushes every other channel."""

    def __init__(self, d, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 32), nn.Linear(32, c)
        shift = torch.zeros(32)
        shift[0] = 1e4
        self.register_buffer("shift", shift)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))) + self.shift)


def build(input_shape, num_classes):
    return Outlier(math.prod(input_shape), num_classes)
'''


def _mlp_outlier() -> nn.Module:
    """Three Linear layers; the first one's hidden channel 0 is a constant 500 that the second one ignores."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)).eval()
    with torch.no_grad():
        m[0].weight[0] = 0.0
        m[0].bias[0] = 500.0
        m[2].weight[:, 0] = 0.0
    return m


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    x = np.random.default_rng(0).standard_normal((1000, 20)).astype(np.float32)
    fp32, pre = d / "m.onnx", d / "m.pre.onnx"
    export_onnx(_mlp_outlier(), x, fp32, 17)
    preprocess(fp32, pre)
    return d, fp32, pre, x, run_session(make_session(fp32), x)


def test_registry_lists_every_flavour_by_precision():
    assert {"tensorrt", "cpu-u8s8", "cpu-s8s8", "cpu-u8s8-reduced", "cpu-dynamic", "cpu-auto"} <= set(list_recipes("int8"))
    assert list_recipes("fp16") == ["fp16"]
    assert get_recipe("cpu-dynamic").kind == "dynamic" and get_recipe("fp16").precision == "fp16"
    with pytest.raises(CompressError, match="not an INT8 recipe"):
        auto_candidates("fp16", Path("unused"), True)


def test_auto_candidates_follow_the_cpu_and_the_model(outlier_model, tmp_path):
    _, fp32, _, x, _ = outlier_model
    assert auto_candidates("cpu-auto", fp32, vnni=True) == ["cpu-u8s8", "cpu-s8s8", "cpu-dynamic"]  # Gemm only: dynamic tried
    assert {"cpu-u8s8-reduced", "cpu-dynamic-reduced"} <= set(auto_candidates("cpu-auto", fp32, vnni=False))  # no VNNI: u8×s8 may saturate
    conv = tmp_path / "conv.onnx"
    export_onnx(nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 18, 3)), np.zeros((2, 1, 20), np.float32), conv, 17)
    assert "cpu-dynamic" not in auto_candidates("cpu-auto", conv, vnni=True)
    assert not {"cpu-dynamic", "cpu-dynamic-reduced"} & set(auto_candidates("cpu-auto", conv, vnni=False))
    assert auto_candidates("tensorrt", conv, vnni=True) == ["tensorrt"]
    assert "cpu-u8s8-float-stem" not in auto_candidates("cpu-auto", fp32, vnni=True)  # no convolution, no stem
    # a stem convolution reading one channel: the float-stem variant is tried, and keeps exactly that conv in float
    assert auto_candidates("cpu-auto", conv, vnni=True)[:2] == ["cpu-u8s8", "cpu-u8s8-float-stem"]
    deep = tmp_path / "deep.onnx"
    export_onnx(nn.Sequential(nn.Conv1d(1, 8, 3), nn.ReLU(), nn.Conv1d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 16, 3)),
                np.zeros((2, 1, 20), np.float32), deep, 17)
    pre = tmp_path / "deep.pre.onnx"
    preprocess(deep, pre)
    q = tmp_path / "deep.q.onnx"
    sig = np.random.default_rng(0).standard_normal((64, 1, 20)).astype(np.float32)
    quantize_with(get_recipe("cpu-u8s8-float-stem"), deep, pre, q, sig)
    assert qdq_summary(q) == {"int8": {"Conv": 1, "Gemm": 1}, "float": {"Conv": 1}}
    assert compare(run_session(make_session(deep), sig), run_session(make_session(q), sig))["agreement"] >= 0.9


def test_dynamic_int8_and_fp16_flavours_match_fp32(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5)).eval()
    x = np.random.default_rng(1).standard_normal((500, 20)).astype(np.float32)
    fp32, pre = tmp_path / "m.onnx", tmp_path / "pre.onnx"
    export_onnx(m, x, fp32, 17)
    preprocess(fp32, pre)
    ref = run_session(make_session(fp32), x)
    from compressor.bench.host import has_vnni

    # 7-bit weights hold on every CPU; full-range u8×s8 products saturate 16-bit sums on x86 CPUs without VNNI
    # (measured on an AVX2-only AMD EPYC: 0.934 agreement), so there cpu-auto also tries cpu-dynamic-reduced
    for name in ("cpu-dynamic-reduced",) + (("cpu-dynamic",) if has_vnni() else ()):
        dyn = tmp_path / f"{name}.onnx"
        quantize_with(get_recipe(name), fp32, pre, dyn, x[:100])
        assert qdq_summary(dyn)["int8"].get("MatMul", 0) >= 2  # weights stored as int8, MatMulInteger at run time
        assert compare(ref, run_session(make_session(dyn), x))["agreement"] >= 0.97, name
    f16 = tmp_path / "f16.onnx"
    quantize_with(get_recipe("fp16"), fp32, pre, f16, x[:100])
    model = onnx.load(str(f16))
    onnx.checker.check_model(model)  # topologically sorted, valid
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 in and out by default
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer if t.data_type in (1, 10))
    cmp = compare(ref, run_session(make_session(f16), x))
    assert cmp["max_abs_diff"] < 2e-2 and cmp["agreement"] >= 0.99, cmp
    f16io = tmp_path / "f16io.onnx"
    quantize_with(get_recipe("fp16"), fp32, pre, f16io, x[:100], keep_io_fp32=False)
    assert onnx.load(str(f16io)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_tensorrt_check_walks_the_graph_node_by_node(outlier_model):
    d, fp32, pre, x, _ = outlier_model
    trt, u8 = d / "trt.onnx", d / "u8.onnx"
    quantize_with(get_recipe("tensorrt"), fp32, pre, trt, x[:200])
    assert check_tensorrt_qdq(trt) == []
    quantize_static_u8 = get_recipe("cpu-u8s8")
    quantize_with(quantize_static_u8, fp32, pre, u8, x[:200])
    problems = check_tensorrt_qdq(u8)
    assert any("zero point" in p for p in problems) and any("INT32" in p for p in problems), problems
    # per-tensor weight scales are caught too
    model = onnx.load(str(trt))
    inits = {t.name: t for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized"))
    scale = inits[dq.input[1]]
    scale.CopyFrom(onnx.numpy_helper.from_array(np.array(1.0, np.float32), scale.name))
    zp = inits[dq.input[2]]
    zp.CopyFrom(onnx.numpy_helper.from_array(np.array(0, np.int8), zp.name))
    assert any("per output channel" in p for p in check_tensorrt_qdq(model))


def test_sensitivity_finds_the_layer_that_reads_the_outlier_and_keeping_it_float_fixes_it(outlier_model):
    d, fp32, pre, x, ref = outlier_model
    plain = d / "plain.onnx"
    quantize_with(get_recipe("cpu-u8s8"), fp32, pre, plain, x[:200])
    assert compare(ref, run_session(make_session(plain), x))["agreement"] < 0.8  # the outlier crushes the hidden layer
    ranking = sensitivity(pre, plain, x[:256])
    assert ranking[0]["node"] == "/2/Gemm", ranking
    kept = d / "kept.onnx"
    quantize_with(get_recipe("cpu-u8s8"), fp32, pre, kept, x[:200], exclude=["/2/Gemm"])
    assert compare(ref, run_session(make_session(kept), x))["agreement"] >= 0.97
    g = onnx.load(str(kept)).graph
    producer = {o: n.op_type for n in g.node for o in n.output}
    node = next(n for n in g.node if n.name == "/2/Gemm")
    assert all(producer.get(i) != "DequantizeLinear" for i in node.input), "the float node still reads a quantized tensor"
    assert qdq_summary(kept) == {"int8": {"Gemm": 2}, "float": {"Gemm": 1}}
    trt = d / "trt-kept.onnx"  # the TensorRT flavour with a node in float still passes its check
    quantize_with(get_recipe("tensorrt"), fp32, pre, trt, x[:200], exclude=["/2/Gemm"])
    assert check_tensorrt_qdq(trt, float_nodes={"/2/Gemm"}) == []


@pytest.fixture(scope="module")
def outlier_run(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("outlier")
    (d / "outlier_student.py").write_text(OUTLIER_SRC)
    cfg = CompressConfig(teacher=str(tiny.torchscript), data=DataConfig(source=str(tiny.npz)), target="cpu",
                         distill=DistillConfig(student=f"{d / 'outlier_student.py'}:build", steps=300, evals=5, device="cpu"),
                         quantize=QuantizeConfig(qat_steps=0),
                         bench=BenchConfig(min_runs=5, min_duration_s=0.01, warmup_ms=1, warmup_runs=1))
    rep = api.compress(cfg, out=d / "run")
    return d / "run", rep


def test_accuracy_aware_mode_keeps_the_sensitive_node_in_float_and_reports_it(outlier_run):
    run, rep = outlier_run
    q = json.loads((run / "manifest.json").read_text())["stages"]["quantize"]["result"]
    assert q["validation"]["metric"] == "accuracy" and q["validation"]["rows"] >= 100
    assert all(t["drop_points"] > q["int8_tolerance"] for t in q["trials"]), q["trials"]  # plain INT8 misses, every recipe
    assert q["within_tolerance"] and q["drop_points"] <= 1.0
    assert q["kept_float"] == [{"node": "/fc2/Gemm", "op": "Gemm"}]
    assert q["accuracy_aware"]["rounds"][0]["kept_float"] == "/fc2/Gemm"
    assert rep["checks"]["quantize"]["kept_float"] == q["kept_float"]
    assert any("kept 1 node(s) in float" in n and "/fc2/Gemm" in n for n in rep["notes"]), rep["notes"]
    assert "Kept in float: `/fc2/Gemm`" in (run / "report.md").read_text()
    by = {m["name"]: m for m in rep["models"]}
    assert by["student onnx fp32"]["accuracy"] - by["student onnx int8"]["accuracy"] <= 0.03  # held-out rows


def test_quantization_aware_distillation_recovers_when_nothing_may_stay_float(outlier_run, monkeypatch):
    run, _ = outlier_run
    import torch

    from compressor.run import Run

    # one intra-op thread: the fine-tuning's float sums then run in one order whatever threads earlier tests left set
    # (in a full suite run this margin case once ended 3.5 points short of the 1-point tolerance, alone it never did)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the runtime's own setting would undo it
    try:
        _qat_recovers(run, Run)
    finally:
        monkeypatch.undo()
        torch.set_num_threads(threads)


def _qat_recovers(run, Run):
    cfg = Run.open(run).config.quantize.replace(max_float_nodes=0, qat_steps=300)
    skipped = api.quantize(run, cfg, force=True).manifest["stages"]["quantize"]["result"]["qat"]
    assert "--trust" in skipped["skipped"]  # fine-tuning rebuilds the student from its code: only with --trust
    api.quantize(run, cfg, force=True, trust=True)
    q = json.loads((run / "manifest.json").read_text())["stages"]["quantize"]["result"]
    assert q["kept_float"] == [] and q["accuracy_aware"] is None
    assert q["qat"]["used"] and q["qat"]["layers"] == 2, q["qat"]
    assert q["within_tolerance"], {k: q[k] for k in ("recipe", "drop_points", "qat", "trials")}
    rep = api.bench(run, force=True)
    assert any("fine-tuned with fake quantization" in n for n in rep["notes"])
    by = {m["name"]: m for m in rep["models"]}
    assert by["student onnx fp32"]["accuracy"] - by["student onnx int8"]["accuracy"] <= 0.03


def test_tensorrt_rule_violation_is_an_error(outlier_model, monkeypatch):
    """The stage never keeps a TensorRT-flavour graph that breaks the rules: a violation found by the walk is an error."""
    from compressor.export import quantize as q

    d, fp32, pre, x, _ = outlier_model
    monkeypatch.setattr(q, "check_tensorrt_qdq", lambda path, float_nodes=(): ["DequantizeLinear w_dq: zero point is UINT8, not INT8"])
    with pytest.raises(CompressError, match="breaks TensorRT's Q/DQ rules at 1 place.*UINT8") as e:
        q.quantize_with(get_recipe("tensorrt"), fp32, pre, d / "bad.onnx", x[:50])
    assert e.value.kind == "runtime"


def test_entropy_calibration_clips_a_long_tail_that_minmax_keeps(tmp_path):
    """Entropy calibration really searches for a threshold (2048 histogram bins), so on activations with a rare
    outlier its input scale is smaller than minmax's; percentile clips too."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    x[::97] *= 40.0  # a few rows far out in the tail
    fp32, pre = tmp_path / "m.onnx", tmp_path / "pre.onnx"
    export_onnx(m, x, fp32, 17)
    preprocess(fp32, pre)

    def input_scale(method):
        out = tmp_path / f"{method}.onnx"
        quantize_with(get_recipe("cpu-u8s8"), fp32, pre, out, x, method=method)
        g = onnx.load(str(out)).graph
        q = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
        return float(onnx.numpy_helper.to_array(next(t for t in g.initializer if t.name == q.input[1])))

    minmax, entropy, percentile = input_scale("minmax"), input_scale("entropy"), input_scale("percentile")
    assert entropy < 0.8 * minmax and percentile < minmax, (minmax, entropy, percentile)


def test_tensorrt_check_reads_float_weights_quantized_in_the_graph():
    """Weights may also come as a float initializer -> QuantizeLinear -> DequantizeLinear (quantized when the engine is
    built): their scales are checked per output channel all the same."""
    from onnx import TensorProto, helper, numpy_helper

    def graph(scale_shape):
        w = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "w")
        ws = numpy_helper.from_array(np.full(scale_shape, 0.1, np.float32), "w_scale")
        wz = numpy_helper.from_array(np.zeros(scale_shape, np.int8), "w_zp")
        xs, xz = numpy_helper.from_array(np.array(0.1, np.float32), "x_scale"), numpy_helper.from_array(np.array(0, np.int8), "x_zp")
        nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="xq"),
                 helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="xd"),
                 helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zp"], ["wq"], name="wq", axis=0),
                 helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["wd"], name="wd", axis=0),
                 helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv")]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, ws, wz, xs, xz])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    assert check_tensorrt_qdq(graph((4,))) == []
    assert any("per output channel" in p for p in check_tensorrt_qdq(graph((2,))))
