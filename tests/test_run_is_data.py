"""A run folder is data: later stages (export, quantize, bench, bundle) never import or execute code that a run
folder names (a student factory, a --teacher-arch, a black-box teacher); the distill stage saves what they need in
forms that load without running code (TorchScript copies, the teacher's held-out answers)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor import api
from compressor.config import CompressConfig, DataConfig, DistillConfig
from compressor.models.query_teacher import query_spec_input

from conftest import small_bench

FAST_BENCH = ("--threads", 1, "--min-runs", 2, "--min-duration", 0)

EVIL_SRC = '''
from pathlib import Path

Path({marker!r}).write_text("imported")  # runs on import: a later stage must never get here


def build(*args, **kwargs):
    Path({marker!r}).write_text("called")
    raise SystemExit("a later stage ran code named by the run folder")
'''

CALLABLE_SRC = '''
from pathlib import Path

import numpy as np
import torch

_M = torch.jit.load({teacher!r})


def logits(x):
    with open({log!r}, "a") as fh:
        fh.write(f"{{len(x)}}\\n")
    with torch.no_grad():
        return _M(torch.from_numpy(np.asarray(x, np.float32))).numpy()
'''


def _pipeline(tiny, out: Path, teacher: str, **kw) -> Path:
    cfg = CompressConfig(teacher=teacher, data=DataConfig(source=str(tiny.npz)), target="jetson", bench=small_bench(),
                         distill=DistillConfig(steps=60, evals=2, device="cpu", student=tiny.student), **kw)
    api.compress(cfg, out=out)
    return out


@pytest.fixture(scope="module")
def code_run(tiny, tmp_path_factory) -> Path:
    """A finished run whose teacher (a state dict + --teacher-arch) and student (file.py:build) both came as code."""
    return _pipeline(tiny, tmp_path_factory.mktemp("code_run") / "run", str(tiny.state_dict), teacher_arch=tiny.arch)


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("*.lock", ".lock*"))
    return dest


def _edit(run: Path, fn) -> None:
    path = run / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def _plant_code(run: Path, tmp_path: Path, marker: Path) -> None:
    """The manifest now names code that creates `marker`: the student factory, the teacher's architecture, and a
    command teacher (its input record rewritten to match, as a forger would, so the hash check passes)."""
    evil = tmp_path / "evil.py"
    evil.write_text(EVIL_SRC.format(marker=str(marker)))
    spec = f"{evil}:build"
    teacher = f"cmd:touch {marker}"

    def change(m):
        m["config"]["distill"]["student"] = spec
        m["config"]["teacher_arch"] = spec
        m["config"]["teacher"] = teacher
        m["inputs"]["teacher"] = query_spec_input(teacher, str(tmp_path))[0]
        m["stages"]["distill"]["result"]["student_record"] = {"spec": spec, "kwargs": {}}

    _edit(run, change)


def _ok_or_one_line_refusal(code: int, err: str) -> None:
    assert code in (0, 2), err
    if code == 2:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err


def test_later_stages_never_run_code_a_manifest_names(code_run, tmp_path, cli):
    run = _copy(code_run, tmp_path / "run")
    marker = tmp_path / "MARKER"
    _plant_code(run, tmp_path, marker)
    code, _, err = cli("-q", "export", run, "--force")
    assert code == 0, err  # from student.jit.pt, saved by distill
    assert not marker.exists()
    code, _, err = cli("-q", "quantize", run, "--force")
    assert code == 0, err
    code, _, err = cli("-q", "bench", run, "--force", *FAST_BENCH)
    assert code == 0, err  # the teacher from teacher.jit.pt, the student from student.jit.pt
    assert not marker.exists()
    code, _, err = cli("-q", "bundle", run, "--force")
    assert code == 0, err  # the teacher's classes on the held-out rows from teacher_heldout.npz
    assert not marker.exists()
    rows = {r["name"]: r for r in json.loads((run / "report.json").read_text())["models"]}
    assert rows["teacher"]["path"] == "teacher.jit.pt" and rows["student"]["accuracy"] > 0.5


def test_without_code_free_copies_later_stages_refuse_in_one_line(code_run, tmp_path, cli):
    run = _copy(code_run, tmp_path / "run")
    marker = tmp_path / "MARKER"
    _plant_code(run, tmp_path, marker)
    for f in ("student.jit.pt", "teacher.jit.pt", "teacher_heldout.npz"):
        (run / f).unlink(missing_ok=True)

    def drop(m):
        for k in ("student_torchscript", "teacher_torchscript", "teacher_heldout"):
            m["stages"]["distill"]["outputs"].pop(k, None)

    _edit(run, drop)
    code, _, err = cli("-q", "export", run, "--force")
    _ok_or_one_line_refusal(code, err)
    assert code == 2 and "was built by code" in err and "--trust" in err
    for argv in (("bench", run, "--force", *FAST_BENCH), ("bundle", run, "--force"), ("quantize", run, "--force")):
        code, _, err = cli("-q", *argv)
        _ok_or_one_line_refusal(code, err)
    code, _, err = cli("-q", "bench", run, "--force", "--trust", *FAST_BENCH)
    _ok_or_one_line_refusal(code, err)
    assert code == 2 and "black box" in err  # --trust runs a factory, never a command the manifest names
    assert not marker.exists()


def test_trust_rebuilds_a_student_from_its_factory_when_no_copy_was_saved(code_run, tmp_path, cli):
    run = _copy(code_run, tmp_path / "run")
    (run / "student.jit.pt").unlink(missing_ok=True)
    _edit(run, lambda m: m["stages"]["distill"]["outputs"].pop("student_torchscript", None))
    code, _, err = cli("-q", "export", run, "--force")
    assert code == 2 and "--trust" in err
    code, _, err = cli("-q", "export", run, "--force", "--trust")
    assert code == 0, err


def test_a_user_factory_student_exports_and_benches_from_its_torchscript_copy(code_run, tiny, tmp_path, cli):
    from compressor.models import load_student
    from compressor.run import Run

    m = json.loads((code_run / "manifest.json").read_text())
    st = m["stages"]["distill"]
    assert st["outputs"]["student_torchscript"] == "student.jit.pt" and st["outputs"]["teacher_torchscript"] == "teacher.jit.pt"
    # the copy gives the state-dict module's outputs
    module = load_student(st["result"]["student_record"], input_shape=tiny.x.shape[1:], num_classes=st["result"]["num_classes"])
    module.load_state_dict(torch.load(code_run / "student.pt", weights_only=True))
    copy = torch.jit.load(str(code_run / "student.jit.pt"))
    x = torch.from_numpy(tiny.x_test)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), module.eval()(x), rtol=1e-4, atol=1e-5)
    # a later stage uses it: the factory file is gone, and export and bench still work, matching PyTorch
    run = _copy(code_run, tmp_path / "run")
    src = tmp_path / "student.py"
    src.write_text(tiny.student_file.read_text())
    spec = f"{src}:build"

    def point(m):
        m["config"]["distill"]["student"] = spec
        m["stages"]["distill"]["result"]["student_record"]["spec"] = spec

    _edit(run, point)
    src.unlink()
    assert isinstance(Run.open(run).load_trained("student"), torch.jit.ScriptModule)
    code, _, err = cli("-q", "export", run, "--force")
    assert code == 0, err
    check = json.loads((run / "manifest.json").read_text())["stages"]["export"]["result"]["check"]
    assert check["agreement"] == 1.0 and check["rows"] == len(tiny.y_test)
    code, _, err = cli("-q", "quantize", run, "--force")
    assert code == 0, err
    code, _, err = cli("-q", "bench", run, "--force", *FAST_BENCH)
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads((run / "report.json").read_text())["models"]}
    teacher_acc = float((tiny.module()(x).argmax(1).numpy() == tiny.y_test).mean())
    assert rows["teacher"]["accuracy"] == pytest.approx(teacher_acc)
    assert rows["student onnx fp32"]["accuracy"] == rows["student"]["accuracy"]


def test_a_black_box_teacher_is_not_asked_again_after_distill(tiny, tmp_path, cli):
    log = tmp_path / "calls.log"
    py = tmp_path / "bb.py"
    py.write_text(CALLABLE_SRC.format(teacher=str(tiny.torchscript), log=str(log)))
    run = _pipeline(tiny, tmp_path / "run", f"{py}:logits")
    assert log.exists()
    rows = {r["name"]: r for r in json.loads((run / "report.json").read_text())["models"]}
    assert rows["teacher"]["format"] == "callable" and rows["teacher"]["accuracy"] > 0.8
    log.unlink()
    code, _, err = cli("-q", "bench", run, "--force", *FAST_BENCH)
    assert code == 0, err
    code, _, err = cli("-q", "bundle", run, "--force")
    assert code == 0, err
    assert not log.exists(), "a later stage queried the black-box teacher the manifest names"
    again = {r["name"]: r for r in json.loads((run / "report.json").read_text())["models"]}
    assert again["teacher"]["accuracy"] == rows["teacher"]["accuracy"]
    (bundle,) = [d for d in run.glob("bundle-*") if d.is_dir()]
    heldout = np.load(bundle / "heldout.npz")
    assert (heldout["teacher_pred"] == np.load(run / "teacher_heldout.npz")["pred"][heldout["index"]]).all()


def test_teacher_cmd_given_as_teacher_is_refused(tiny, tmp_path, cli):
    marker = tmp_path / "MARKER"
    code, _, err = cli("-q", "distill", "--teacher", f"cmd:touch {marker}", "--data", tiny.npz, "--steps", 5, "--out", tmp_path / "run")
    assert code == 2 and "--teacher-cmd" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
