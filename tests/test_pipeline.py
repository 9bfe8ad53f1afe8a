"""The public API end to end on the tiny data: distill, export, quantize, bench and report, with the
numbers checked, the INT8 graph inspected, finished stages skipped on a rerun and redone with force."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor import api
from compressor._io import sha256_file
from compressor.bench.report import load_report, validate_report
from compressor.config import BenchConfig, CompressConfig, DataConfig, DistillConfig
from compressor.errors import CompressError

STEPS = 150


def _cfg(tiny, bench: BenchConfig, target="jetson", teacher=None, **distill):
    d = dict(steps=STEPS, baseline=True, evals=5, device="cpu")
    d.update(distill)
    return CompressConfig(teacher=str(teacher or tiny.torchscript), data=DataConfig(source=str(tiny.npz)), target=target,
                          distill=DistillConfig(**d), bench=bench)


def _mtimes(run: Path, names=("student.pt", "baseline.pt", "student.onnx", "student.int8.onnx", "report.json")) -> dict:
    return {n: (run / n).stat().st_mtime_ns for n in names}


def _leftover_temps(run: Path) -> list[str]:
    return [str(p.relative_to(run)) for p in run.rglob("*")
            if (p.name.startswith(".") and p.name.endswith(".tmp")) or p.name.startswith(".quantize-")]


@pytest.fixture(scope="module")
def jetson_run(tiny, tmp_path_factory):
    bench = BenchConfig(threads=1, min_runs=5, min_duration_s=0.01, warmup_ms=1, warmup_runs=1, eval_batch_size=512)
    out = tmp_path_factory.mktemp("pipeline") / "run"
    rep = api.compress(_cfg(tiny, bench), out=out)
    return out, rep, bench


def _acc(module, x, y) -> float:
    with torch.no_grad():
        return float((module.eval()(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def test_report_is_written_and_valid(jetson_run, tiny):
    out, rep, _ = jetson_run
    on_disk = load_report(out / "report.json")  # validates against the shipped schema
    validate_report(rep)
    assert on_disk["models"] == rep["models"]
    assert (out / "report.md").is_file()
    kinds = {(m["role"], m["format"], m["precision"]) for m in rep["models"]}
    assert kinds == {("teacher", "pytorch", "fp32"), ("student", "pytorch", "fp32"), ("baseline", "pytorch", "fp32"),
                     ("student", "onnx", "fp32"), ("student", "onnx", "fp16"), ("student", "onnx", "int8")}  # jetson takes fp16
    for m in rep["models"]:
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["agreement"] <= 1.0
        assert m["size_bytes"] > 0 and m["params"] > 0 and m["latency_ms"]["p50"] > 0
        assert (out / m["path"]).is_file()
    assert rep["data"] == {"name": str(tiny.npz), "train_labeled": int((tiny.y >= 0).sum()),
                           "train_unlabeled": int((tiny.y < 0).sum()), "heldout": len(tiny.y_test), "heldout_source": "x_test"}
    by = {m["name"]: m for m in rep["models"]}
    assert by["teacher"]["agreement"] == 1.0
    # the teacher's accuracy in the report is its real accuracy on the held-out rows
    assert by["teacher"]["accuracy"] == pytest.approx(_acc(tiny.module(), tiny.x_test, tiny.y_test))
    # the report embeds the configs that produced it
    assert rep["configs"]["distill"]["steps"] == STEPS and rep["configs"]["bench"]["min_runs"] == 5
    assert rep["teacher"]["format"] == "torchscript"


def test_distilled_student_beats_an_untrained_one(jetson_run, tiny):
    from compressor.models import load_student

    out, rep, _ = jetson_run
    manifest = json.loads((out / "manifest.json").read_text())
    res = manifest["stages"]["distill"]["result"]
    torch.manual_seed(123)
    untrained = load_student(res["student_record"], input_shape=tiny.x.shape[1:], num_classes=res["num_classes"])
    trained = load_student(res["student_record"], input_shape=tiny.x.shape[1:], num_classes=res["num_classes"])
    trained.load_state_dict(torch.load(out / "student.pt", weights_only=True))
    acc_trained, acc_untrained = _acc(trained, tiny.x_test, tiny.y_test), _acc(untrained, tiny.x_test, tiny.y_test)
    by = {m["name"]: m for m in rep["models"]}
    assert by["student"]["accuracy"] == pytest.approx(acc_trained)
    assert acc_trained >= acc_untrained + 0.15, (acc_trained, acc_untrained)
    assert acc_trained >= 0.6
    assert res["params"] * 5 <= res["teacher_params"], "the default student should be much smaller than the teacher"


def test_onnx_matches_pytorch_and_int8_stays_close(jetson_run):
    _, rep, _ = jetson_run
    by = {m["name"]: m for m in rep["models"]}
    student, fp32, int8 = by["student"], by["student onnx fp32"], by["student onnx int8"]
    assert abs(fp32["accuracy"] - student["accuracy"]) <= 0.005
    assert rep["checks"]["export"]["max_abs_diff"] <= 1e-3
    assert rep["checks"]["export"]["agreement"] >= 0.999
    assert fp32["accuracy"] - int8["accuracy"] <= 0.05
    assert rep["checks"]["quantize"]["recipe"] == "tensorrt" and rep["target"]["int8_recipe"] == "tensorrt"
    # (no size check: on a model this small the Q/DQ scales and names outweigh the 4x smaller weights)


def test_onnx_export_really_agrees_with_pytorch(jetson_run, tiny):
    """Recompute the check ourselves instead of trusting the report."""
    from compressor.export.onnx_io import make_session, run_session
    from compressor.models import load_student

    out, _, _ = jetson_run
    res = json.loads((out / "manifest.json").read_text())["stages"]["distill"]["result"]
    m = load_student(res["student_record"], input_shape=tiny.x.shape[1:], num_classes=res["num_classes"])
    m.load_state_dict(torch.load(out / "student.pt", weights_only=True))
    with torch.no_grad():
        ref = m.eval()(torch.from_numpy(tiny.x_test)).numpy()
    got = run_session(make_session(out / "student.onnx"), tiny.x_test, batch_size=7)  # dynamic batch axis works
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_tensorrt_int8_graph_is_symmetric_per_channel_with_float_biases(jetson_run):
    import onnx
    from onnx import numpy_helper

    out, _, _ = jetson_run
    model = onnx.load(str(out / "student.int8.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq, "the INT8 model has no Q/DQ nodes"
    for n in qdq:
        assert len(n.input) == 3, f"{n.name}: zero point missing"
        zp = inits[n.input[2]]
        assert zp.data_type == onnx.TensorProto.INT8, f"{n.name}: zero point is {onnx.TensorProto.DataType.Name(zp.data_type)}"
        assert not numpy_helper.to_array(zp).any(), f"{n.name}: zero point not 0"
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")]
    assert weighted
    for n in weighted:
        dq = producers.get(n.input[1])
        assert dq is not None and dq.op_type == "DequantizeLinear", f"{n.name}: weight is not quantized"
        w, scale = inits[dq.input[0]], numpy_helper.to_array(inits[dq.input[1]])
        assert w.data_type == onnx.TensorProto.INT8
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if n.op_type == "Conv" or (n.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in n.attribute)):
            out_channels = w.dims[0]
        else:
            out_channels = w.dims[1]
        assert scale.ndim == 1 and len(scale) == out_channels and w.dims[axis] == out_channels, (n.name, scale.shape, axis)
        if len(n.input) > 2 and n.input[2]:
            bias = n.input[2]
            assert bias in inits and inits[bias].data_type == onnx.TensorProto.FLOAT, f"{n.name}: bias is quantized"
            assert bias not in producers
    assert not any(t.data_type == onnx.TensorProto.INT32 for t in model.graph.initializer), "int32 (quantized) biases found"


def test_latency_is_labelled_as_measured_on_the_host(jetson_run):
    from compressor.bench.host import describe_host

    out, rep, _ = jetson_run
    t = rep["target"]
    assert t["name"] == "jetson-orin-nano-8gb" and t["latency_measured_on"] == "host"
    assert describe_host()["cpu"] in t["latency_note"] and "NOT on the target" in t["latency_note"]
    assert t["latency_note"] in (out / "report.md").read_text()


def test_manifest_records_inputs_and_stages(jetson_run, tiny):
    out, rep, _ = jetson_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["teacher"]["sha256"] == sha256_file(tiny.torchscript)
    assert manifest["inputs"]["teacher"]["path"] == str(tiny.torchscript.resolve())
    assert rep["teacher"]["sha256"] == sha256_file(tiny.torchscript)
    assert manifest["inputs"]["data"]["fingerprint"] == sha256_file(tiny.npz)
    for s in ("distill", "export", "quantize", "bench", "report"):
        assert manifest["stages"][s]["status"] == "done", s
    assert CompressConfig.from_dict(manifest["config"]).distill.steps == STEPS


def test_export_checks_of_every_transformation_are_in_the_manifest_and_report(jetson_run):
    out, rep, _ = jetson_run
    res = json.loads((out / "manifest.json").read_text())["stages"]["export"]["result"]
    assert res["opset"] == 17
    assert [c["transformation"] for c in res["checks"]] == ["export", "simplify"]
    assert all(c["passed"] and c["atol"] == 1e-3 and c["min_agreement"] == 0.999 for c in res["checks"])
    assert res["runtime_ops"]["runtime"] == "tensorrt 10.3"
    # the report's export check is the shipped (simplified) graph's
    assert rep["checks"]["export"]["transformation"] == "simplify" and rep["checks"]["export"]["opset"] == 17


def test_no_temporary_files_are_left(jetson_run):
    out, _, _ = jetson_run
    assert _leftover_temps(out) == []


def test_rerun_skips_finished_stages_and_force_redoes_them(jetson_run, tiny):
    out, rep, bench = jetson_run
    before = _mtimes(out)
    again = api.compress(_cfg(tiny, bench), out=out)
    assert _mtimes(out) == before, "a rerun with the same inputs must not redo finished stages"
    assert again["models"] == rep["models"]
    forced = api.compress(_cfg(tiny, bench), out=out, force=True)
    after = _mtimes(out)
    assert all(after[k] > before[k] for k in before), (before, after)
    # same seed, same data: the forced rerun reproduces the student exactly
    by_a, by_b = ({m["name"]: m["accuracy"] for m in r["models"]} for r in (rep, forced))
    assert by_a == by_b
    assert _leftover_temps(out) == []


def test_changed_settings_redo_the_stage_and_everything_after(tiny, tmp_path, tiny_bench):
    out = tmp_path / "run"
    api.compress(_cfg(tiny, tiny_bench, steps=20, baseline=False), out=out)
    names = ("student.pt", "student.onnx", "student.int8.onnx", "report.json")
    before = _mtimes(out, names)
    api.compress(_cfg(tiny, tiny_bench, steps=25, baseline=False), out=out)
    after = _mtimes(out, names)
    assert all(after[k] > before[k] for k in names)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["distill"]["result"]["student"]["steps"] == 25
    # a later stage alone with new settings redoes only itself and what follows
    before = _mtimes(out, names)
    api.bench(out, BenchConfig(threads=1, min_runs=6, min_duration_s=0.01, warmup_ms=1, warmup_runs=1))
    after = _mtimes(out, names)
    assert after["student.int8.onnx"] == before["student.int8.onnx"] and after["report.json"] > before["report.json"]
    assert load_report(out / "report.json")["configs"]["bench"]["min_runs"] == 6


def test_cpu_target_picks_a_cpu_recipe(tiny, tmp_path, tiny_bench):
    out = tmp_path / "run"
    rep = api.compress(_cfg(tiny, tiny_bench, target="cpu", steps=30, baseline=False), out=out)
    q = rep["checks"]["quantize"]
    assert q["requested"] == "cpu-auto" and q["recipe"].startswith("cpu-")
    tried = {t["recipe"] for t in q["trials"]}
    assert tried <= {"cpu-u8s8", "cpu-u8s8-float-stem", "cpu-s8s8", "cpu-u8s8-reduced"} and q["trials"]
    assert "cpu-u8s8-float-stem" in tried  # the built-in 1-D student's first conv reads one channel
    assert q["recipe"] in {t["recipe"] for t in q["trials"]}
    assert rep["target"]["latency_measured_on"] == "target" and rep["target"]["name"] == "cpu"
    assert {m["role"] for m in rep["models"]} == {"teacher", "student"}
    assert _leftover_temps(out) == []


@pytest.mark.parametrize("fmt", ["onnx", "exported", "state_dict"])
def test_distill_from_other_teacher_formats_sees_the_same_logits(tiny, tmp_path, fmt):
    ref_run = api.distill(CompressConfig(teacher=str(tiny.torchscript), data=DataConfig(source=str(tiny.npz)),
                                         distill=DistillConfig(steps=2, evals=1, device="cpu")), tmp_path / "ref")
    run = api.distill(CompressConfig(teacher=str(getattr(tiny, fmt)), teacher_arch=tiny.arch if fmt == "state_dict" else None,
                                     data=DataConfig(source=str(tiny.npz)), distill=DistillConfig(steps=2, evals=1, device="cpu")),
                      tmp_path / "run")
    a = np.load(ref_run.path("cache/teacher_pool_logits.npy"))
    b = np.load(run.path("cache/teacher_pool_logits.npy"))
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert run.stage("distill")["result"]["teacher_format"] == {"onnx": "onnx", "exported": "torch.export", "state_dict": "state_dict"}[fmt]


def test_teacher_changed_after_the_run_started_is_refused(tiny, tmp_path):
    teacher = tmp_path / "teacher.pt"
    shutil.copy(tiny.torchscript, teacher)
    api.distill(CompressConfig(teacher=str(teacher), data=DataConfig(source=str(tiny.npz)),
                               distill=DistillConfig(steps=2, evals=1, device="cpu")), tmp_path / "run")
    shutil.copy(tiny.exported, teacher)
    with pytest.raises(CompressError, match="changed since this run started"):
        api.export(tmp_path / "run")


def test_labels_beyond_the_teacher_classes_are_refused(tiny, tmp_path):
    x, y = tiny.x[:200], tiny.y[:200].copy()
    y[:5] = 4
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=x, y=y, x_test=tiny.x_test, y_test=tiny.y_test)
    with pytest.raises(CompressError, match="labels go up to 4"):
        api.distill(CompressConfig(teacher=str(tiny.torchscript), data=DataConfig(source=str(bad)),
                                   distill=DistillConfig(steps=2, device="cpu")), tmp_path / "run")


def test_data_that_does_not_fit_the_teacher_is_refused(tiny, tmp_path):
    bad = tmp_path / "wide.npz"
    np.savez(bad, x=np.zeros((60, 9), np.float32), y=np.arange(60) % 3)
    with pytest.raises(CompressError, match="cannot run on data of shape"):
        api.distill(CompressConfig(teacher=str(tiny.torchscript), data=DataConfig(source=str(bad)),
                                   distill=DistillConfig(steps=2, device="cpu")), tmp_path / "run")


def test_stage_before_its_inputs_exist_is_refused(tmp_path):
    with pytest.raises(CompressError, match="not a run directory"):
        api.export(tmp_path)
    with pytest.raises(CompressError, match="not a run directory"):
        api.bench(tmp_path)


def test_image_folder_pipeline_with_the_builtin_2d_student(tmp_path, tiny_bench):
    """Images: 8x8 grayscale, class = bright/dark blob position; the default student is a small CNN (BatchNorm)."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def img(c):
        a = rng.integers(0, 60, (8, 8)).astype(np.uint8)
        if c == 0:
            a[:4] += 180
        else:
            a[4:] += 180
        return a

    for split, n in (("train", 40), ("test", 12)):
        for c, name in enumerate(("top", "bottom")):
            d = tmp_path / "imgs" / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(img(c), "L").save(d / f"{i}.png")
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, padding=1),
                                  torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64, 32),
                                  torch.nn.ReLU(), torch.nn.Linear(32, 2))
    from compressor.data import load_data

    ds = load_data(DataConfig(source=str(tmp_path / "imgs" / "train")))
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(teacher(torch.from_numpy(np.asarray(ds.x))), torch.from_numpy(ds.y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    tpath = tmp_path / "teacher.pt"
    torch.jit.save(torch.jit.script(teacher.eval()), str(tpath))
    rep = api.compress(CompressConfig(teacher=str(tpath), data=DataConfig(source=str(tmp_path / "imgs" / "train")), target="jetson",
                                      distill=DistillConfig(steps=60, batch_size=32, evals=3, device="cpu"), bench=tiny_bench),
                       out=tmp_path / "run")
    assert rep["data"]["heldout_source"] == "folder" and rep["data"]["heldout"] == 24
    by = {m["name"]: m for m in rep["models"]}
    assert by["teacher"]["accuracy"] >= 0.9
    assert by["student"]["accuracy"] >= 0.9
    assert abs(by["student onnx fp32"]["accuracy"] - by["student"]["accuracy"]) <= 0.05
    assert by["student onnx int8"]["accuracy"] >= 0.8
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["distill"]["result"]["student_record"]["spec"] == "builtin:cnn2d"
    # image data: the tool's own preprocessing of one image is timed and shown next to the models
    pre = rep["preprocessing"]
    assert pre["latency_ms"]["p50"] > 0 and Path(pre["image"]).is_file() and "resize" in pre["what"]
    assert "Preprocessing, timed the same way" in (tmp_path / "run" / "report.md").read_text()
