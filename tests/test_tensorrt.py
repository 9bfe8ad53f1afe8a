"""The TensorRT path: which flags each TensorRT version gets, the build driven through a stand-in `tensorrt`
module (flags, network type, optimisation profile, parser errors), the errors without TensorRT or a GPU, and,
where both exist (marker `tensorrt`), real engines checked against ONNX Runtime."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from compressor.errors import CompressError
from compressor.export import tensorrt as trt_export
from compressor.runtime import trt_core
from compressor.runtime.tensorrt import TensorRTRunner

from conftest import LENGTH


# --- flag choice: pure logic ---------------------------------------------------------------------------
@pytest.mark.parametrize("version, precision, graph, typed, flags, trtexec", [
    ("10.3", "int8", "int8", False, ["INT8"], ["--int8"]),           # JetPack 6: weakly typed, a Q/DQ graph needs the INT8 flag only
    ("10.3.0.30", "fp16", "fp32", False, ["FP16"], ["--fp16"]),
    ("10.3", "fp32", "fp32", False, [], []),
    ("10.8", "fp16", "fp16", True, [], ["--stronglyTyped"]),         # an FP16 graph keeps its own types
    ("11.0", "int8", "int8", True, [], ["--stronglyTyped"]),         # 11: no precision flags, always strongly typed
    ("11.4.1", "fp32", "fp32", True, [], ["--stronglyTyped"]),
    ("11.0", "fp16", "fp16", True, [], ["--stronglyTyped"]),
])
def test_flags_follow_the_tensorrt_version(version, precision, graph, typed, flags, trtexec):
    plan = trt_core.choose_flags(version, precision, graph)
    assert plan == {"strongly_typed": typed, "builder_flags": flags, "trtexec": trtexec}


@pytest.mark.parametrize("version, precision, graph, msg", [
    ("11.0", "fp16", "fp32", "has no FP16 builder flag"),
    ("10.3", "int8", "fp32", "needs a Q/DQ graph"),     # never a calibrator
    ("11.0", "int8", "fp32", "needs a Q/DQ graph"),
    ("10.3", "fp32", "int8", "builds as an INT8 engine only"),
    ("8.6", "fp32", "fp32", "older than 10"),
    ("ten", "fp32", "fp32", "cannot read a TensorRT version"),
    ("10.3", "int4", None, "unknown precision"),
])
def test_flags_refuse_what_the_version_cannot_build(version, precision, graph, msg):
    with pytest.raises(trt_core.EngineError, match=msg):
        trt_core.choose_flags(version, precision, graph)
    if precision in trt_core.PRECISIONS:  # the package's own wrapper says it as a CompressError (exit 2)
        with pytest.raises(CompressError, match=msg) as e:
            trt_export.plan_flags(precision, graph or precision, profile_version=version)
        assert e.value.exit_code == 2


def test_plan_uses_the_installed_version_and_flags_a_mismatch_with_the_profile():
    plan = trt_export.plan_flags("int8", "int8", trt_version="11.1.0", profile_version="10.3")
    assert plan["strongly_typed"] and plan["builder_flags"] == [] and plan["tensorrt_version"] == "11.1.0"
    assert "will not load there" in plan["note"]
    same = trt_export.plan_flags("int8", "int8", trt_version="10.3.0.30", profile_version="10.3")
    assert same["builder_flags"] == ["INT8"] and "note" not in same
    assert trt_export.plan_flags("fp16", "fp32", profile_version="10.3")["trtexec"] == ["--fp16"]  # nothing installed: the profile's
    with pytest.raises(CompressError, match="no TensorRT version"):
        trt_export.plan_flags("fp32", "fp32")


def test_shapes_and_summaries():
    assert trt_core.shapes_arg("input", ["batch", 3, 8, 8], (1, 4, 16)) == [
        "--minShapes=input:1x3x8x8", "--optShapes=input:4x3x8x8", "--maxShapes=input:16x3x8x8"]
    s = trt_core.summarize_ms([1.0, 2.0, 3.0, 4.0])
    assert s["p50"] == 2.5 and s["min"] == 1.0 and s["runs"] == 4 and s["mean"] == 2.5
    assert trt_core.summarize_ms([])["runs"] == 0


def test_graph_precision_reads_the_onnx_file(tiny, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    assert trt_export.graph_precision(tiny.onnx) == "fp32"
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zp = helper.make_tensor("z", TensorProto.INT8, [], [0])
    qdq = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
                            "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [scale, zp])
    onnx.save(helper.make_model(qdq), tmp_path / "qdq.onnx")
    half = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT16)], "half",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 4])])
    onnx.save(helper.make_model(half), tmp_path / "half.onnx")
    assert trt_export.graph_precision(tmp_path / "qdq.onnx") == "int8"
    assert trt_export.graph_precision(tmp_path / "half.onnx") == "fp16"
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(CompressError, match="not a readable ONNX model"):
        trt_export.graph_precision(tmp_path / "junk.onnx")


# --- the build through a stand-in tensorrt module --------------------------------------------------------
def fake_tensorrt(version: str, *, parse_ok: bool = True, errors=(), serialized=b"ENGINE-BYTES"):
    """Just enough of TensorRT's Python API for build_serialized, recording what it is asked."""
    calls = {"flags": [], "profiles": [], "network_flags": None, "parsed": None, "profile_added": False}
    major = int(version.split(".")[0])
    builder_flag = SimpleNamespace() if major >= 11 else SimpleNamespace(INT8="INT8", FP16="FP16")  # 11 removed them

    class Logger:
        WARNING = 2

        def __init__(self, severity=None):
            pass

    class Network:
        num_inputs = 1

        def get_input(self, i):
            return SimpleNamespace(name="input", shape=(-1, LENGTH))

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = len(errors)

        def parse_from_file(self, path):
            calls["parsed"] = path
            return parse_ok

        def get_error(self, i):
            return errors[i]

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls["profiles"].append((name, tuple(lo), tuple(opt), tuple(hi)))

    class Config:
        def set_flag(self, flag):
            calls["flags"].append(flag)

        def add_optimization_profile(self, profile):
            calls["profile_added"] = True

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return serialized

    mod = SimpleNamespace(__version__=version, Logger=Logger, Builder=Builder, OnnxParser=Parser, BuilderFlag=builder_flag,
                          NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1), MemoryPoolType=SimpleNamespace(WORKSPACE=0))
    return mod, calls


@pytest.mark.parametrize("version, network_flags, flags", [("10.3.0", 0, ["INT8"]), ("11.0.0", 1 << 1, [])])
def test_build_engine_sets_what_the_version_needs(version, network_flags, flags, tmp_path, monkeypatch):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    import onnx
    from onnx import TensorProto, helper

    # a small Q/DQ graph (one MatMul) made the way the tensorrt recipe makes them
    w = helper.make_tensor("w", TensorProto.FLOAT, [LENGTH, 3], np.random.default_rng(0).standard_normal((LENGTH, 3)).astype(np.float32).ravel())
    g = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["logits"])], "g",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", LENGTH])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], [w])
    fp32 = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), fp32)

    class Rows(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": np.random.default_rng(i).standard_normal((1, LENGTH)).astype(np.float32)} for i in range(8)])

        def get_next(self):
            return next(self.it, None)

    qdq = tmp_path / "m.int8.onnx"
    quantize_static(str(fp32), str(qdq), Rows(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    mod, calls = fake_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    out = tmp_path / "m.engine"
    info = trt_export.build_engine(qdq, out, target={"runtime": {"version": "10.3"}}, batch=(1, 2, 16))
    assert out.read_bytes() == b"ENGINE-BYTES" and info["size_bytes"] == len(b"ENGINE-BYTES")
    assert info["precision"] == info["graph"] == "int8"
    assert calls["network_flags"] == network_flags and calls["flags"] == flags
    assert calls["profiles"] == [("input", (1, LENGTH), (2, LENGTH), (16, LENGTH))] and calls["profile_added"]
    assert ("note" in info) == version.startswith("11")  # a 10.3 target cannot load an 11.x engine: said so
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # written atomically


def test_parser_errors_name_the_failing_node(tiny, tmp_path, monkeypatch):
    err = SimpleNamespace(desc=lambda: "Assertion failed: unsupported attribute", node_name=lambda: "/fc1/Gemm",
                          node_operator=lambda: "Gemm", node=lambda: 3)
    mod, _ = fake_tensorrt("10.3.0", parse_ok=False, errors=[err])
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    with pytest.raises(CompressError) as e:
        trt_export.build_engine(tiny.onnx, tmp_path / "t.engine")
    assert "cannot parse teacher.onnx: Gemm node '/fc1/Gemm': Assertion failed: unsupported attribute" in e.value.message
    assert e.value.exit_code == 3 and not (tmp_path / "t.engine").exists()
    # older parsers say only the node's index
    assert trt_core.describe_parser_error(SimpleNamespace(desc=lambda: "bad", node=lambda: 7)) == "#7: bad"
    assert trt_core.describe_parser_error(SimpleNamespace(desc=lambda: "bad", node=lambda: -1)) == "bad"


def test_a_failed_build_writes_nothing(tiny, tmp_path, monkeypatch):
    mod, _ = fake_tensorrt("10.3.0", serialized=None)
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    with pytest.raises(CompressError, match="could not build an engine") as e:
        trt_export.build_engine(tiny.onnx, tmp_path / "t.engine")
    assert e.value.exit_code == 3 and list(tmp_path.iterdir()) == []


# --- without TensorRT, without a GPU -------------------------------------------------------------------
def test_missing_tensorrt_is_a_clear_error(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(CompressError, match="TensorRT is not installed") as e:
        trt_export.build_engine(tiny.onnx, tmp_path / "t.engine")
    assert e.value.exit_code == 2 and "pip install tensorrt" in e.value.hint
    engine = tmp_path / "t.engine"
    engine.write_bytes(b"x")
    with pytest.raises(CompressError, match="TensorRT is not installed"):
        TensorRTRunner(engine).activate()
    assert trt_core.installed_version() is None
    with pytest.raises(CompressError, match="does not exist"):
        TensorRTRunner(tmp_path / "missing.engine").activate()


def test_no_gpu_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    mod, _ = fake_tensorrt("10.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    monkeypatch.setitem(sys.modules, "cuda", None)  # no cuda-python: the torch.cuda path answers
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    engine = tmp_path / "t.engine"
    engine.write_bytes(b"x")
    with pytest.raises(CompressError, match="no NVIDIA GPU") as e:
        TensorRTRunner(engine).activate()
    assert e.value.exit_code == 2


def test_importing_the_tensorrt_modules_loads_no_tensorrt():
    code = ("import sys, json\n"
            "import compressor.export.tensorrt, compressor.runtime.tensorrt, compressor.runtime.trt_core, compressor.bundle\n"
            "print(json.dumps({m: m in sys.modules for m in ('tensorrt', 'cuda', 'onnxruntime')}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"tensorrt": False, "cuda": False, "onnxruntime": False}


# --- real TensorRT on a GPU ----------------------------------------------------------------------------------
def _real_tensorrt():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    try:
        trt_core.cuda_backend().close()
    except trt_core.TensorRTUnavailable as exc:
        pytest.skip(f"no NVIDIA GPU ({exc.message})")
    return trt


@pytest.mark.tensorrt
def test_real_fp32_engine_matches_onnxruntime(tiny, tmp_path):
    from compressor.bench.latency import measure
    from compressor.export.onnx_io import make_session, run_session

    _real_tensorrt()
    engine = tmp_path / "teacher.engine"
    info = trt_export.build_engine(tiny.onnx, engine, batch=(1, 1, 64))
    assert engine.stat().st_size == info["size_bytes"] > 0
    ref = run_session(make_session(tiny.onnx), tiny.x_test)
    with TensorRTRunner(engine) as r:
        got = np.concatenate([r.infer(tiny.x_test[i:i + 64]) for i in range(0, len(tiny.x_test), 64)])
        lat = measure(lambda: r.infer(tiny.x_test[:1]), min_runs=20, min_duration_s=0.05)
        assert len(r.gpu_times_ms) >= lat["runs"] and min(r.gpu_times_ms) > 0
    np.testing.assert_allclose(got, ref, atol=1e-3)  # TF32 may round FP32 math slightly
    assert r.describe()["format"] == "tensorrt" and r.describe()["gpu"]


@pytest.mark.tensorrt
def test_real_int8_engine_from_qdq_agrees_with_onnxruntime(tiny, tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    from compressor.export.onnx_io import make_session, run_session

    _real_tensorrt()

    class Rows(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": tiny.x[i:i + 1]} for i in range(128)])

        def get_next(self):
            return next(self.it, None)

    qdq = tmp_path / "teacher.int8.onnx"
    quantize_static(str(tiny.onnx), str(qdq), Rows(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=True,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    engine = tmp_path / "teacher.int8.engine"
    info = trt_export.build_engine(qdq, engine)
    assert info["precision"] == "int8"
    ref = run_session(make_session(qdq), tiny.x_test).argmax(1)
    with TensorRTRunner(engine) as r:
        got = np.concatenate([r.infer(tiny.x_test[i:i + 32]) for i in range(0, len(tiny.x_test), 32)]).argmax(1)
    assert np.mean(got == ref) >= 0.95
