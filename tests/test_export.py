"""The export stage: export -> checker -> simplify (onnxslim) -> checker, each graph checked against PyTorch and
recorded; unsupported operations named with the student module they come from; graphs checked against what the
target's runtime can run (TensorRT's operator list, ONNX Runtime's session)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

from compressor import api
from compressor.config import CompressConfig, DataConfig, DistillConfig
from compressor.errors import CompressError
from compressor.export.onnx_io import compare, export_onnx, make_session, run_session
from compressor.export.op_support import check_runtime_ops, explain_ort_failure, tensorrt_ops
from compressor.targets import get_target


@pytest.fixture(scope="module")
def distilled(tiny, tmp_path_factory) -> Path:
    """A run whose distill stage has finished: the built-in cnn1d student, jetson target (TensorRT 10.3)."""
    out = tmp_path_factory.mktemp("export") / "run"
    api.distill(CompressConfig(teacher=str(tiny.torchscript), data=DataConfig(source=str(tiny.npz)), target="jetson",
                               distill=DistillConfig(steps=20, evals=1, baseline=False, device="cpu")), out)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _result(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["stages"]["export"]["result"]


def _torch_logits(run: Path, x: np.ndarray) -> np.ndarray:
    from compressor.run import Run

    with torch.no_grad():
        return Run.open(run).load_trained("student")(torch.from_numpy(x)).numpy()


# --- simplification and the check after every transformation ---------------------------------------------
def test_simplified_graph_agrees_with_pytorch_and_every_check_is_recorded(distilled, tiny, tmp_path):
    run = _copy(distilled, tmp_path / "run")
    api.export(run)
    res = _result(run)
    assert [c["transformation"] for c in res["checks"]] == ["export", "simplify"]
    assert res["opset"] == 17 and res["check"]["opset"] == 17  # the jetson profile's runtime.onnx_opset
    for c in res["checks"]:
        assert c["passed"] and c["checker"] == "pass"
        assert c["atol"] == 1e-3 and c["min_agreement"] == 0.999  # each check carries the tolerance it was held to
        assert c["max_abs_diff"] <= c["atol"] and c["agreement"] >= c["min_agreement"] and c["rows"] == len(tiny.x_test)
    assert res["checks"][1]["tool"].startswith("onnxslim ")
    simp = res["simplify"]
    assert simp["applied"] and simp["reason"] is None and simp["nodes_after"] < simp["nodes_before"]
    # the shipped file is the simplified graph, and it really agrees with PyTorch (recomputed here)
    model = onnx.load(str(run / "student.onnx"))
    assert len(model.graph.node) == res["checks"][1]["nodes"] == simp["nodes_after"]
    onnx.checker.check_model(model, full_check=True)
    got = run_session(make_session(run / "student.onnx"), tiny.x_test, batch_size=7)  # the batch axis stayed dynamic
    np.testing.assert_allclose(got, _torch_logits(run, tiny.x_test), atol=1e-4)
    assert res["check"]["transformation"] == "simplify"
    assert res["runtime_ops"]["runtime"] == "tensorrt 10.3" and "Conv" in res["runtime_ops"]["op_types"]


def test_no_simplify_on_the_pipeline_and_on_export_skips_it(cli, tiny, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli("-q", "distill", "--teacher", tiny.torchscript, "--data", tiny.npz, "--target", "cpu", "--steps", 3,
                       "--no-baseline", "--no-simplify", "--out", out)
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["config"]["export"]["simplify"] is False
    code, _, err = cli("-q", "export", out)
    assert code == 0, err
    res = _result(out)
    assert [c["transformation"] for c in res["checks"]] == ["export"]
    assert res["simplify"] == {"requested": False, "applied": False}
    assert len(onnx.load(str(out / "student.onnx")).graph.node) == res["checks"][0]["nodes"]
    # turned back on for the stage alone: the stage is redone with the simplifier
    code, _, err = cli("-q", "export", out, "--simplify")
    assert code == 0, err
    assert [c["transformation"] for c in _result(out)["checks"]] == ["export", "simplify"]


def test_simplifier_that_raises_falls_back_to_the_exported_graph_and_says_why(distilled, tmp_path, monkeypatch):
    import onnxslim

    def boom(model, *a, **kw):
        raise RuntimeError("pattern matcher exploded")

    monkeypatch.setattr(onnxslim, "slim", boom)
    run = _copy(distilled, tmp_path / "run")
    api.export(run)
    res = _result(run)
    assert res["simplify"]["applied"] is False
    assert res["simplify"]["reason"] == "onnxslim raised RuntimeError: pattern matcher exploded"
    assert [c["transformation"] for c in res["checks"]] == ["export"] and res["checks"][0]["passed"]
    assert len(onnx.load(str(run / "student.onnx")).graph.node) == res["simplify"]["nodes_before"]
    assert not [p for p in run.rglob("*.tmp")]


def test_simplified_graph_that_differs_from_pytorch_is_an_error_naming_the_step(cli, distilled, tmp_path, monkeypatch):
    import onnxslim
    from onnx import numpy_helper

    real = onnxslim.slim

    def wrong(model, *a, **kw):  # a "simplifier" that changes the numbers: every weight scaled by 1.5
        m = real(model, *a, **kw)
        for t in m.graph.initializer:
            if t.data_type == TensorProto.FLOAT:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, t.name))
        return m

    monkeypatch.setattr(onnxslim, "slim", wrong)
    run = _copy(distilled, tmp_path / "run")
    code, _, err = cli("export", run)
    assert code == 3, err
    line = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert line.startswith("error: the simplify step (onnxslim") and "differs from PyTorch" in line and "--no-simplify" in line
    assert not (run / "student.onnx").exists() and not [p for p in run.rglob("*.tmp")]
    assert json.loads((run / "manifest.json").read_text())["stages"]["export"]["status"] == "failed"


def test_simplified_graph_that_fails_the_checker_is_an_error_naming_the_step(distilled, tmp_path, monkeypatch):
    import onnxslim

    real = onnxslim.slim

    def broken(model, *a, **kw):
        m = real(model, *a, **kw)
        m.graph.node.append(helper.make_node("NoSuchOp", [m.graph.output[0].name], ["dangling"], name="/bad/NoSuchOp"))
        return m

    monkeypatch.setattr(onnxslim, "slim", broken)
    run = _copy(distilled, tmp_path / "run")
    with pytest.raises(CompressError) as e:
        api.export(run)
    assert e.value.message.startswith("the simplified (onnxslim") and "fails onnx.checker" in e.value.message
    assert e.value.hint == "rerun with --no-simplify" and e.value.exit_code == 3
    assert not (run / "student.onnx").exists() and not [p for p in run.rglob("*.tmp")]


# --- operations the exporter cannot export ---------------------------------------------------------------
class _KthCentre(nn.Module):
    def forward(self, x):
        return x - torch.kthvalue(x, 2, dim=1, keepdim=True).values  # aten::kthvalue has no ONNX symbolic


class _WithKth(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.centre = nn.Sequential(nn.ReLU(), _KthCentre())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.centre(self.lin(x)))


class _WithFold(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 16)
        self.fold = nn.Fold(output_size=(3, 3), kernel_size=2)  # aten::col2im: ONNX Col2Im exists from opset 18 only
        self.head = nn.Linear(9, 3)

    def forward(self, x):
        return self.head(self.fold(self.lin(x).reshape(-1, 4, 4)).flatten(1))


def test_op_without_an_onnx_export_names_the_op_the_module_and_an_alternative(tmp_path):
    with pytest.raises(CompressError) as e:
        export_onnx(_WithKth(), np.zeros((2, 8), np.float32), tmp_path / "m.onnx", 17)
    err = e.value
    assert err.kind == "runtime" and err.exit_code == 3
    assert "cannot be exported to ONNX (opset 17)" in err.message and "aten::kthvalue" in err.message
    assert "in module 'centre.1' (_KthCentre)" in err.message
    assert "replace the unsupported operation aten::kthvalue in 'centre.1' (_KthCentre)" in err.hint and "torch.topk" in err.hint
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.iterdir())


def test_op_without_a_symbolic_at_this_opset_suggests_the_opset_that_has_it(tmp_path):
    with pytest.raises(CompressError) as e:
        export_onnx(_WithFold(), np.zeros((2, 8), np.float32), tmp_path / "m.onnx", 17, exporters=("torchscript",))
    assert "aten::col2im" in e.value.message and "in module 'fold' (Fold)" in e.value.message
    assert "--opset 18" in e.value.hint
    # the exporter chain: the torch.export-based exporter (opset 18) takes over and says why the first was not used
    info = export_onnx(_WithFold(), np.zeros((2, 8), np.float32), tmp_path / "chain.onnx", 17)
    assert info["exporter"] == "dynamo" and info["opset"] == 18 and "col2im" in info["rejected"][0]["reason"]
    # and the suggestion is right: at opset 18 it exports and agrees with PyTorch
    m = _WithFold().eval()
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    export_onnx(m, x, tmp_path / "m18.onnx", 18)
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    assert compare(ref, run_session(make_session(tmp_path / "m18.onnx"), x))["max_abs_diff"] < 1e-5


# --- operations the target's runtime cannot run ------------------------------------------------------------
def _tiny_graph(path: Path, op: str, dtype=TensorProto.FLOAT, domain: str = "", opset: int = 17, out_shape=(2, 2)) -> Path:
    """input (2, 2) -> one `op` node named like the exporter names nodes (by module scope) -> output."""
    node = helper.make_node(op, ["input"], ["logits"], name=f"/block/block.1/{op}", domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", dtype, [2, 2])],
                              [helper.make_tensor_value_info("logits", dtype, list(out_shape))])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=imports), str(path))
    return path


def test_tensorrt_target_refuses_an_op_missing_from_its_operator_list(tmp_path):
    path = _tiny_graph(tmp_path / "det.onnx", "Det", out_shape=())  # valid ONNX that ONNX Runtime runs, but not TensorRT 10.x
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    make_session(path)
    names = ["", "block", "block.0", "block.1"]
    with pytest.raises(CompressError) as e:
        check_runtime_ops(path, get_target("jetson"), 17, names, produced_by="simplify")
    err = e.value
    assert err.message == "TensorRT 10.3 cannot run node '/block/block.1/Det' (op Det, module block.1) of the simplify graph"
    assert "replace the operation behind Det in block.1" in err.hint and err.exit_code == 3
    # an op from another domain is not on the list either
    with pytest.raises(CompressError, match=r"op com\.example:Foo"):
        check_runtime_ops(_tiny_graph(tmp_path / "foo.onnx", "Foo", domain="com.example"), get_target("jetson"), 17, names)
    # the same graph on the cpu target: ONNX Runtime's session creation is the check, and it runs Det
    assert check_runtime_ops(path, get_target("cpu"), 17)["runtime"] == "onnxruntime"


def test_tensorrt_opset_outside_its_range_is_refused(tmp_path):
    path = _tiny_graph(tmp_path / "relu.onnx", "Relu")
    assert check_runtime_ops(path, get_target("jetson"), 17)["op_types"] == ["Relu"]
    with pytest.raises(CompressError, match="reads ONNX opsets 9 to 20, but the export uses opset 21") as e:
        check_runtime_ops(path, get_target("jetson"), 21)
    assert "--opset 20" in e.value.hint


def test_onnx_runtime_failure_names_the_node_and_the_op(tmp_path):
    path = _tiny_graph(tmp_path / "abs.onnx", "Abs", dtype=TensorProto.BFLOAT16)  # valid ONNX; no bf16 Abs kernel on ORT's CPU
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    with pytest.raises(CompressError) as e:
        make_session(path)
    err = explain_ort_failure(e.value, path, ["", "block", "block.1"], produced_by="export")
    assert err.message.startswith("ONNX Runtime cannot run node '/block/block.1/Abs' (op Abs, module block.1) of the export graph")
    assert "replace the operation behind Abs in block.1" in err.hint and err.exit_code == 3


def test_tensorrt_operator_list_is_shipped_with_its_source_and_covers_the_builtin_students(tmp_path):
    from compressor.models.student import cnn1d, cnn2d, mlp, transformer

    table = tensorrt_ops("10.3")
    assert "onnx/onnx-tensorrt" in table["source"] and "10.1-GA" in table["source"] and table["versions"] == "10.1-10.3"
    assert {"Conv", "Gemm", "MatMul", "LayerNormalization", "Softmax"} <= set(table["supported"])
    assert {"Det", "Unique", "NonZero"} & set(table["unsupported"]) == {"Det", "Unique"}
    assert tensorrt_ops("8.6") is None
    torch.manual_seed(0)
    for name, module, x in [("cnn1d", cnn1d((32,), 3), np.zeros((2, 32), np.float32)),
                            ("cnn2d", cnn2d((1, 8, 8), 3), np.zeros((2, 1, 8, 8), np.float32)),
                            ("mlp", mlp((32,), 3), np.zeros((2, 32), np.float32)),
                            ("transformer", transformer((16,), 3, 32, vocab_size=50), np.zeros((2, 16), np.int64))]:
        path = tmp_path / f"{name}.onnx"
        export_onnx(module, x, path, 17)
        check_runtime_ops(path, get_target("jetson"), 17)  # raises if TensorRT 10.3 could not parse it
