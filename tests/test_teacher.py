"""Teachers: the format comes from the content, every format gives the same logits, and every bad
input is a CompressError with a message that says what to do."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from compressor.errors import CompressError
from compressor.models import load_teacher


def _reference(tiny, rows=64):
    with torch.no_grad():
        return tiny.module()(torch.from_numpy(tiny.x_test[:rows])).numpy()


@pytest.mark.parametrize("attr,fmt,kw", [
    ("torchscript", "torchscript", {}),
    ("exported", "torch.export", {}),
    ("onnx", "onnx", {}),
    ("state_dict", "state_dict", "arch"),
    ("pickled", "pickle", {"trust": True}),
])
def test_every_format_loads_and_matches_the_torch_module(tiny, attr, fmt, kw):
    kwargs = {"arch": tiny.arch} if kw == "arch" else kw
    t = load_teacher(getattr(tiny, attr), **kwargs)
    assert t.format == fmt
    assert t.white_box == (fmt != "onnx")
    out = t.logits(tiny.x_test[:64], batch_size=16)  # several batches, including a ragged last one
    assert out.shape == (64, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, _reference(tiny), atol=1e-4, rtol=1e-4)
    assert t.num_params() == sum(p.numel() for p in tiny.module().parameters())


@pytest.mark.parametrize("attr,name,fmt", [
    ("torchscript", "model.onnx", "torchscript"),
    ("onnx", "model.pt", "onnx"),
    ("exported", "model.bin", "torch.export"),
    ("torchscript", "model", "torchscript"),
])
def test_format_is_detected_from_content_not_extension(tiny, tmp_path, attr, name, fmt):
    p = tmp_path / name
    shutil.copy(getattr(tiny, attr), p)
    t = load_teacher(p)
    assert t.format == fmt
    np.testing.assert_allclose(t.logits(tiny.x_test[:8]), _reference(tiny, 8), atol=1e-4, rtol=1e-4)


def test_state_dict_without_arch_asks_for_teacher_arch(tiny):
    with pytest.raises(CompressError, match="--teacher-arch"):
        load_teacher(tiny.state_dict)


def test_state_dict_with_wrong_arch_is_a_clear_error(tiny, tmp_path):
    f = tmp_path / "wrong.py"
    f.write_text("import torch.nn as nn\ndef build():\n    return nn.Linear(3, 3)\n")
    with pytest.raises(CompressError, match="does not fit"):
        load_teacher(tiny.state_dict, arch=f"{f}:build")


def test_pickled_module_needs_trust(tiny):
    with pytest.raises(CompressError, match="--trust") as ei:
        load_teacher(tiny.pickled)
    assert ei.value.exit_code == 2
    t = load_teacher(tiny.pickled, trust=True)
    assert t.format == "pickle"


@pytest.mark.parametrize("make", ["missing", "empty", "random", "folder", "text"])
def test_unreadable_teacher_files_are_compress_errors(tmp_path, make):
    p = tmp_path / "teacher.pt"
    if make == "empty":
        p.write_bytes(b"")
    elif make == "random":
        p.write_bytes(np.random.default_rng(1).bytes(4096))
    elif make == "folder":
        p.mkdir()
    elif make == "text":
        p.write_text("this is not a model\n" * 20)
    with pytest.raises(CompressError):
        load_teacher(p)


@pytest.mark.parametrize("attr", ["torchscript", "exported", "onnx", "state_dict", "pickled"])
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_teacher_is_a_compress_error(tiny, tmp_path, attr, fraction):
    data = getattr(tiny, attr).read_bytes()
    p = tmp_path / "cut.pt"
    p.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CompressError):
        load_teacher(p, arch=tiny.arch, trust=True)


def test_zip_that_is_not_a_model_is_refused(tmp_path):
    import zipfile

    p = tmp_path / "stuff.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(CompressError, match="not a model file"):
        load_teacher(p)


def test_data_file_given_as_teacher_is_refused(tiny):
    with pytest.raises(CompressError):
        load_teacher(tiny.npz)


def test_tensor_or_dict_that_is_not_a_state_dict_is_refused(tmp_path):
    p = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), p)
    with pytest.raises(CompressError, match="not a model or a state dict"):
        load_teacher(p)
    q = tmp_path / "empty_dict.pt"
    torch.save({}, q)
    with pytest.raises(CompressError):
        load_teacher(q, arch="x.py:build")


ARCH_CASES = {
    "raises": "def build():\n    raise ValueError('no architecture today')\n",
    "not_module": "def build():\n    return {'a': 1}\n",
    "import_error": "import definitely_not_a_module_xyz\ndef build():\n    pass\n",
    "not_callable": "build = 3\n",
}


@pytest.mark.parametrize("case", sorted(ARCH_CASES))
def test_bad_arch_factory_is_a_compress_error(tiny, tmp_path, case):
    f = tmp_path / f"arch_{case}.py"
    f.write_text(ARCH_CASES[case])
    with pytest.raises(CompressError, match="--teacher-arch"):
        load_teacher(tiny.state_dict, arch=f"{f}:build")


@pytest.mark.parametrize("spec", ["no_colon_here", "/nonexistent/arch.py:build", "not_a_real_pkg_xyz.mod:build"])
def test_bad_arch_spec_is_a_compress_error(tiny, spec):
    with pytest.raises(CompressError, match="--teacher-arch"):
        load_teacher(tiny.state_dict, arch=spec)


def test_teacher_that_cannot_run_on_the_data_says_so(tiny):
    t = load_teacher(tiny.torchscript)
    with pytest.raises(CompressError, match="cannot run on data of shape"):
        t.logits(np.zeros((4, 7), np.float32))


@pytest.mark.parametrize("fmt", ["torch.export", "onnx"])
def test_teacher_exported_with_a_fixed_batch_size_still_runs(tiny, tmp_path, fmt):
    m = load_teacher(tiny.state_dict, arch=tiny.arch).module  # a plain nn.Module
    x2 = torch.from_numpy(tiny.x[:2])
    p = tmp_path / "static.model"
    if fmt == "torch.export":
        torch.export.save(torch.export.export(m, (x2,)), str(p))
    else:
        torch.onnx.export(m, (x2,), str(p), input_names=["input"], opset_version=17, dynamo=False)
    t = load_teacher(p)
    assert t.format == fmt and t.fixed_batch == 2
    # 5 rows: two full batches of 2 and a padded last one
    np.testing.assert_allclose(t.logits(tiny.x_test[:5]), _reference(tiny, 5), atol=1e-4, rtol=1e-4)


# --- teachers whose outputs are probabilities, and outputs that are not class scores (issue 17) -----------------------
class _Softmax(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.softmax(self.inner(x), dim=1)


class _Scalar(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).sum()


@pytest.fixture(scope="module")
def prob_teachers(tiny, tmp_path_factory):
    """The fixture teacher ending in softmax, as TorchScript and ONNX; and one that reduces its batch to a scalar."""
    d = tmp_path_factory.mktemp("probs")
    m = load_teacher(tiny.state_dict, arch=tiny.arch).module
    ts, onnx_path, scalar = d / "softmax.ts.pt", d / "softmax.onnx", d / "scalar.ts.pt"
    torch.jit.save(torch.jit.script(_Softmax(m)), str(ts))
    torch.onnx.export(_Softmax(m), (torch.from_numpy(tiny.x[:2]),), str(onnx_path), input_names=["input"], output_names=["probs"],
                      dynamic_axes={"input": {0: "batch"}, "probs": {0: "batch"}}, opset_version=17, dynamo=False)
    torch.jit.save(torch.jit.script(_Scalar(m)), str(scalar))
    return {"torchscript": ts, "onnx": onnx_path, "scalar": scalar}


def _log_softmax_reference(tiny, x, floor=1e-7):
    """The teacher's log-probabilities, floored at log(1e-7) as documented (float32 softmax underflows far below it)."""
    with torch.no_grad():
        ls = torch.log_softmax(tiny.module()(torch.from_numpy(np.ascontiguousarray(x))), dim=1).numpy()
    return np.maximum(ls, np.log(floor)) if floor else ls


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_probability_outputs_are_detected_and_read_as_log_probabilities(tiny, prob_teachers, fmt):
    from compressor.distill.trainer import OnlineTeacher
    from compressor.models.outputs import resolve_teacher_output

    t = load_teacher(prob_teachers[fmt])
    raw = t.logits(tiny.x[:16])
    np.testing.assert_allclose(raw.sum(1), 1.0, atol=1e-5)  # the file really answers probabilities
    rec = resolve_teacher_output(t, tiny.x, "auto")
    assert rec["kind"] == "probs" and rec["detected"] and rec["rows"] >= 8
    np.testing.assert_allclose(t.logits(tiny.x_test[:40]), _log_softmax_reference(tiny, tiny.x_test[:40]), atol=1e-4)
    if t.white_box:  # the teacher run on every (augmented) batch gives log-probabilities too
        online = OnlineTeacher(t, "cpu")(torch.from_numpy(tiny.x_test[:40])).numpy()
        np.testing.assert_allclose(online, _log_softmax_reference(tiny, tiny.x_test[:40]), atol=1e-4)
    # --teacher-output logits: no detection, the outputs stay as they are
    t2 = load_teacher(prob_teachers[fmt])
    rec = resolve_teacher_output(t2, tiny.x, "logits")
    assert rec["kind"] == "logits" and not rec["detected"]
    np.testing.assert_allclose(t2.logits(tiny.x[:16]), raw, atol=1e-6)
    # a logits teacher is never taken for probabilities; asked to read it as probabilities, it is an error
    plain = load_teacher(tiny.torchscript)
    assert resolve_teacher_output(plain, tiny.x, "auto")["kind"] == "logits"
    with pytest.raises(CompressError, match="not probabilities"):
        resolve_teacher_output(load_teacher(tiny.torchscript), tiny.x, "probs")


def test_kd_on_a_probability_teacher_sees_log_probabilities(tiny, prob_teachers, tmp_path, monkeypatch):
    """Plain KD took softmax outputs for logits. The loss now receives their log, whatever the teacher's format;
    --teacher-output logits turns the detection off."""
    from compressor import api
    from compressor.config import CompressConfig, DataConfig, DistillConfig
    from compressor.distill import trainer

    seen = []
    real = trainer.train_student

    def spy(module, x, y, teacher_logits, *a, **kw):
        seen.append((np.array(x), None if teacher_logits is None else np.array(teacher_logits)))
        return real(module, x, y, teacher_logits, *a, **kw)

    monkeypatch.setattr(trainer, "train_student", spy)

    def run(out, **distill):
        cfg = CompressConfig(teacher=str(prob_teachers["torchscript"]), data=DataConfig(source=str(tiny.npz)), preflight=False,
                             distill=DistillConfig(**{"loss": "kd", "steps": 20, "evals": 2, "device": "cpu", "student": tiny.student, **distill}))
        seen.clear()
        return api.distill(cfg, out).stage("distill")["result"]

    res = run(tmp_path / "auto")
    x, t = seen[0]
    np.testing.assert_allclose(t, _log_softmax_reference(tiny, x), atol=1e-4)
    assert res["teacher_output"]["kind"] == "probs" and res["teacher_output"]["detected"]
    assert res["student"]["loss"] == "kd" and "teacher_queries" not in res  # the white-box flow, with the loss asked for
    assert any("outputs are probabilities" in n and "--teacher-output logits" in n for n in res["notes"])

    res = run(tmp_path / "asked-logits", teacher_output="logits")
    x, t = seen[0]
    np.testing.assert_allclose(t, np.exp(_log_softmax_reference(tiny, x, floor=None)), atol=1e-5)  # the raw probabilities
    assert res["teacher_output"]["kind"] == "logits" and res["notes"] == []

    res = run(tmp_path / "asked-probs", teacher_output="probs", loss="dkd")  # a file teacher: probs no longer needs the black-box flow
    x, t = seen[0]
    np.testing.assert_allclose(t, _log_softmax_reference(tiny, x), atol=1e-4)
    assert res["student"]["loss"] == "dkd" and not res["teacher_output"]["detected"]


def test_report_notes_a_detected_probability_teacher(tiny, prob_teachers, tmp_path, tiny_bench):
    from compressor import api
    from compressor.config import CompressConfig, DataConfig, DistillConfig, QuantizeConfig

    cfg = CompressConfig(teacher=str(prob_teachers["onnx"]), data=DataConfig(source=str(tiny.npz)), target="jetson", preflight=False,
                         distill=DistillConfig(steps=20, evals=2, device="cpu", student=tiny.student),
                         quantize=QuantizeConfig(qat_steps=0, max_float_nodes=0), bench=tiny_bench)
    rep = api.compress(cfg, out=tmp_path / "run")
    assert any("outputs are probabilities" in n for n in rep["notes"]), rep["notes"]
    assert "outputs are probabilities" in (tmp_path / "run" / "report.md").read_text()


def test_scalar_or_non_tensor_teacher_output_is_a_compress_error(tiny, prob_teachers, cli, tmp_path):
    with pytest.raises(CompressError, match=r"returns a scalar \(a 0-d tensor\) for a batch of 4 rows"):
        load_teacher(prob_teachers["scalar"]).logits(tiny.x[:4])
    code, _, err = cli("distill", "--teacher", prob_teachers["scalar"], "--data", tiny.npz, "--out", tmp_path / "run")
    assert code == 2 and "returns a scalar" in err and err.count("\n") == 1, err
