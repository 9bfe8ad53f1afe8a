"""The students people write (tests/zoo_models.py): each exports through the exporter chain with a dynamic batch, matches
PyTorch at another batch size, passes the TensorRT operator list, quantizes with the tensorrt recipe (Q/DQ rule check
inside) and with every cpu-auto candidate for this CPU, and runs in ONNX Runtime. The two that cannot ship get an error
that names the operation and the module (or the fixed batch) and what to do instead."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from compressor.bench.host import has_vnni
from compressor.errors import CompressError
from compressor.export.onnx_io import compare, export_onnx, make_session, run_session
from compressor.export.op_support import check_runtime_ops
from compressor.export.quantize import auto_candidates, check_tensorrt_qdq, get_recipe, preprocess, quantize_with
from compressor.targets import get_target
from zoo_models import EXPECTED_FAILURES, SHIPPABLE, ZOO, build, make_input


def _logits(m, x):
    with torch.no_grad():
        y = m(torch.from_numpy(x))
    return (y[0] if isinstance(y, tuple) else next(iter(y.values())) if isinstance(y, dict) else y).numpy()


def _verify(x, ref):
    def verify(path):
        res = compare(ref, run_session(make_session(path), x))
        if res["max_abs_diff"] > 1e-4:
            raise CompressError(f"max abs diff {res['max_abs_diff']:.2e}")
    return verify


def test_the_zoo_has_every_kind_the_issue_names():
    assert len(ZOO) >= 18 and len(SHIPPABLE) >= 18


@pytest.mark.parametrize("name", SHIPPABLE)
def test_zoo_student_exports_checks_and_quantizes(name, tmp_path):
    m, _ = build(name)
    x = make_input(name, 16)  # the export sees 2 rows: 16 checks the batch axis is really dynamic
    ref = _logits(m, x)
    fp32, pre = tmp_path / "m.onnx", tmp_path / "pre.onnx"
    info = export_onnx(m, x, fp32, 17, verify=_verify(x, ref))
    assert info["exporter"] == ("dynamo" if name == "adaptive_avg_7to2" else "torchscript"), info
    if name == "adaptive_avg_7to2":  # the TorchScript-based exporter refuses the non-dividing pool; the chain says why
        assert "adaptive_avg_pool2d" in info["rejected"][0]["reason"] and info["opset"] == 18
    check_runtime_ops(fp32, get_target("jetson"), info["opset"])  # every op on TensorRT 10.3's list
    preprocess(fp32, pre)
    trt = tmp_path / "trt.onnx"
    quantize_with(get_recipe("tensorrt"), fp32, pre, trt, x)  # raises on a TensorRT Q/DQ rule violation
    assert check_tensorrt_qdq(trt) == []
    emulated = run_session(make_session(trt, emulate_qdq=True), x)
    assert emulated.shape == ref.shape and np.isfinite(emulated).all()
    for recipe in auto_candidates("cpu-auto", fp32, has_vnni()):
        q = tmp_path / f"{recipe}.onnx"
        quantize_with(get_recipe(recipe), fp32, pre, q, x)
        out = run_session(make_session(q), x)
        assert out.shape == ref.shape and np.isfinite(out).all(), recipe


@pytest.mark.parametrize("name", sorted(EXPECTED_FAILURES))
def test_zoo_students_that_cannot_ship_say_why(name, tmp_path):
    m, _ = build(name)
    x = make_input(name, 16)
    with pytest.raises(CompressError) as e:
        export_onnx(m, x, tmp_path / "m.onnx", 17, verify=_verify(x, _logits(m, x)))
    text = str(e.value)
    assert all(w in text for w in EXPECTED_FAILURES[name]), text
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("name", SHIPPABLE)
def test_zoo_student_takes_the_accuracy_aware_search(name, tmp_path):
    """The accuracy-aware path (rank quantized nodes by added error, keep the worst in float, requantize) runs on every
    zoo graph, whichever exporter made it and whatever its node names: with a tolerance of 0 points it must keep a node."""
    from compressor.config import QuantizeConfig
    from compressor.export.tolerance import Validation, evaluate, keep_sensitive_in_float

    m, _ = build(name)
    x = make_input(name, 64)
    ref = _logits(m, x)
    fp32, pre = tmp_path / "m.onnx", tmp_path / "pre.onnx"
    export_onnx(m, x, fp32, 17)
    preprocess(fp32, pre)
    recipe = "tensorrt"
    q = tmp_path / "q.onnx"
    quantize_with(get_recipe(recipe), fp32, pre, q, x)
    val = Validation(x, None, ref)
    base = {"recipe": recipe, **evaluate(q, val, 1.0, recipe), "fallback": None, "path": q, "kept_float": []}
    found = keep_sensitive_in_float(fp32, pre, base, x, val, QuantizeConfig(int8_tolerance=0.0, max_float_nodes=1), tmp_path, say=lambda *_: None)
    rounds = found["search"]["rounds"]
    assert len(rounds) == 1 and rounds[0]["kept_float"], found["search"]  # a node was ranked, kept in float and requantized
    assert check_tensorrt_qdq(tmp_path / f"{recipe}-float1.onnx", float_nodes={rounds[0]["kept_float"]}) == []
