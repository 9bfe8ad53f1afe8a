"""compress gate re-times a baseline bundle beside the current run on this machine: identical models pass when the
settings that shift relative speeds differ (threads), where a gate on per-run ratios to the teacher fails; a student
made 30% slower fails, also while a CPU-heavy process runs beside the gate; the bundle is checksummed and never
overwrites or deletes a file the tool did not write."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from compressor import api
from compressor.config import GateConfig
from conftest import make_finished_run, small_bench

QUICK = GateConfig(rounds=7, round_duration_s=0.1)
QUICK_ARGS = ("--rounds", "7", "--round-duration", "0.1")
INT8 = "student onnx int8"


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """One finished run; a baseline bundle of it benched with 2 threads at batch 16 (b2) and one with 1 thread at batch 1
    (b1); the run itself left benched like b1. The models in all three are the same files; the settings shift relative
    speeds (per-call overheads of torch and ONNX Runtime amortise differently over a batch, threads help each unequally)."""
    d = tmp_path_factory.mktemp("retime")
    run = make_finished_run(tiny, d / "run", "cpu")
    from compressor.bench.retime import open_side, write_bundle

    api.bench(run, small_bench(threads=2, batch_size=16, repeat=5, min_duration_s=0.1, min_runs=50), force=True)
    write_bundle(open_side(run, "run"), d / "b2")
    api.bench(run, small_bench(threads=1, repeat=5, min_duration_s=0.1, min_runs=50), force=True)
    write_bundle(open_side(run, "run"), d / "b1")
    return run, d / "b1", d / "b2"


def _ratio_gate_fails(cur: dict, base: dict, limit: float = 0.10) -> list[str]:
    """The rule the gate used before re-timing: each model's best round over the teacher's best round, taken inside
    each report; a ratio that grows by more than `limit` (with Mann-Whitney p < 0.05 on the per-round ratios) failed."""
    from compressor.gate import mann_whitney_greater

    def ratios(rep):
        t = min(rep["models"][0]["latency_ms"]["samples_p50"])
        return {m["name"]: [v / t for v in m["latency_ms"]["samples_p50"]] for m in rep["models"][1:]}
    rb, rc = ratios(base), ratios(cur)
    return [n for n in rb if min(rc[n]) / min(rb[n]) - 1 > limit and mann_whitney_greater(rc[n], rb[n]) < 0.05]


def _slow_current(monkeypatch, run, name: str = INT8, factor: float = 0.30):
    """Make compress gate's runner for the current run's `name` model `factor` slower (runtime.SlowedRunner)."""
    from compressor.bench import retime
    from compressor.runtime import SlowedRunner

    real = retime.make_runner
    row = next(m for m in json.loads((run / "report.json").read_text())["models"] if m["name"] == name)
    target = (run / row["path"]).resolve()

    def make_runner(path, row_, threads):
        r = real(path, row_, threads)
        return SlowedRunner(r, factor) if path.resolve() == target else r
    monkeypatch.setattr(retime, "make_runner", make_runner)


@pytest.fixture
def hog():
    """A CPU-heavy process beside the gate for the duration of a test."""
    p = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 600\nwhile time.time() < end: sum(i * i for i in range(10000))"])
    time.sleep(0.2)
    yield p
    p.kill()
    p.wait()


def _latency(res, name):
    return next(c for c in res.checks if c.model == name and c.check == "latency")


def test_the_bundle_holds_the_files_that_retime_without_code(runs):
    run, b1, _ = runs
    marker = json.loads((b1 / "gate-baseline.json").read_text())
    assert set(marker["files"]) == {"report.json", "latency_sample.npy", "teacher.torchscript.pt", "student.torchscript.pt",
                                    "student-onnx-fp32.onnx", "student-onnx-int8.onnx"}
    rep = json.loads((b1 / "report.json").read_text())
    timed = {m["name"]: m.get("timing_file") for m in rep["models"]}
    assert timed["student"] == "student.torchscript.pt" and timed[INT8] == "student-onnx-int8.onnx"


def test_retiming_passes_identical_models_where_the_ratio_gate_fails(runs, cli):
    """Baseline benched with 2 threads at batch 16, current with 1 thread at batch 1 (and the other way round), the same
    model files: per-run ratios to the teacher move by more than the threshold, while re-timing both sides here passes."""
    run, b1, b2 = runs
    rep1, rep2 = (json.loads((b / "report.json").read_text()) for b in (b1, b2))
    moved = _ratio_gate_fails(rep1, rep2) + _ratio_gate_fails(rep2, rep1)
    assert moved, "these settings should move the students' latency ratios to the teacher by more than 10%"
    for cur, base in ((run, b2), (b2, b1)):  # a bundle can be the current side too
        res = api.gate(cur, base, QUICK)
        assert res.passed, [(c.model, c.detail) for c in res.failed]
        lat = [c for c in res.checks if c.check == "latency"]
        assert {c.model for c in lat if "re-timed here" in c.detail} == {"teacher", "student", "student onnx fp32", INT8}
    code, out, _ = cli("gate", run, "--baseline", b2, *QUICK_ARGS)
    assert code == 0 and "4 re-timed here" in out


def test_a_student_made_30_percent_slower_fails(runs, cli, monkeypatch, tmp_path):
    from junitparser import Failure, JUnitXml

    run, _, b2 = runs
    _slow_current(monkeypatch, run)
    code, out, _ = cli("gate", run, "--baseline", b2, *QUICK_ARGS, "--junit", tmp_path / "g.xml")
    assert code == 1 and "gate FAIL" in out
    failed = {(c.classname, c.name) for s in JUnitXml.fromfile(str(tmp_path / "g.xml")) for c in s if any(isinstance(r, Failure) for r in c.result)}
    assert failed == {(INT8, "latency")}


def test_under_load_identical_models_pass_and_the_slowdown_is_caught(runs, hog, monkeypatch):
    run, _, b2 = runs
    for _ in range(2):
        res = api.gate(run, b2, QUICK)
        assert res.passed, [(c.model, c.detail) for c in res.failed]
    _slow_current(monkeypatch, run)
    res = api.gate(run, b2, QUICK)
    assert [(c.model, c.check) for c in res.failed] == [(INT8, "latency")], [(c.model, c.detail) for c in res.checks if c.check == "latency"]
    assert hog.poll() is None  # the load really ran beside the gate


def test_a_row_without_a_code_free_file_says_why(runs, tmp_path):
    """A PyTorch row saved only as a state dict is not re-timed (its code is not run); from another host its latency
    check is a skip that says both why it is not comparable and why it was not re-timed."""
    run, b1, _ = runs
    cur = tmp_path / "run"
    shutil.copytree(run, cur)
    rep = json.loads((cur / "report.json").read_text())
    rep["host"]["cpu"] = "Another CPU"
    for m in rep["models"]:
        m.pop("timing_file", None)
    (cur / "report.json").write_text(json.dumps(rep))
    res = api.gate(cur, b1, QUICK)
    chk = _latency(res, "student")
    assert chk.status == "skip" and "not comparable: measured on" in chk.detail and "state dict" in chk.detail
    assert "re-timed here" in _latency(res, INT8).detail and res.passed


def test_a_changed_bundle_file_is_refused(runs, cli, tmp_path):
    run, b1, _ = runs
    b = tmp_path / "b"
    shutil.copytree(b1, b)
    (b / "student-onnx-int8.onnx").write_bytes((b / "student-onnx-int8.onnx").read_bytes() + b"\0")
    code, _, err = cli("gate", run, "--baseline", b)
    assert code == 2 and "checksum" in err
    shutil.rmtree(b)
    shutil.copytree(b1, b)
    m = json.loads((b / "gate-baseline.json").read_text())
    m["files"]["../../etc/passwd"] = "0" * 64
    (b / "gate-baseline.json").write_text(json.dumps(m))
    code, _, err = cli("gate", run, "--baseline", b)
    assert code == 2 and "not a plain file name" in err


def test_update_baseline_owns_only_its_files(runs, cli, tmp_path):
    run, _, _ = runs
    b = tmp_path / "ci-baseline"
    b.mkdir()
    (b / "gate.toml").write_text("max_accuracy_drop = 1.0\n")  # the user's own file beside the bundle
    code, out, _ = cli("gate", run, "--baseline", b, "--update-baseline")
    assert code == 0 and "baseline bundle" in out
    assert (b / "gate.toml").read_text() == "max_accuracy_drop = 1.0\n"
    # a file of the user's under a name the bundle would write: refused, untouched
    c = tmp_path / "foreign"
    c.mkdir()
    (c / "report.json").write_text("mine")
    code, _, err = cli("gate", run, "--baseline", c, "--update-baseline")
    assert code == 2 and "not written by the tool" in err and (c / "report.json").read_text() == "mine"
    # an update replaces the bundle's own files and removes those it no longer has, nothing else
    m = json.loads((b / "gate-baseline.json").read_text())
    (b / "old-model.onnx").write_bytes(b"x")
    from compressor._io import sha256_file

    m["files"]["old-model.onnx"] = sha256_file(b / "old-model.onnx")
    (b / "gate-baseline.json").write_text(json.dumps(m))
    code, _, _ = cli("gate", run, "--baseline", b, "--update-baseline", *QUICK_ARGS)
    assert code == 0 and not (b / "old-model.onnx").exists() and (b / "gate.toml").exists()
    assert not list(b.glob(".*.tmp"))
    # a bare report cannot make a bundle: the model files are not there
    bare = tmp_path / "bare.json"
    shutil.copyfile(run / "report.json", bare)
    code, _, err = cli("gate", bare, "--baseline", tmp_path / "new-bundle", "--update-baseline")
    assert code == 2 and "run directory" in err


def test_a_run_folder_never_names_code_or_files_outside_it(runs, tmp_path, monkeypatch):
    """A report row whose path reads 'cmd:…' (or leaves the run) is a file name at most, and not one the gate opens."""
    run, b1, _ = runs
    cur = tmp_path / "run"
    shutil.copytree(run, cur)
    rep = json.loads((cur / "report.json").read_text())
    marker = cur / "PWNED"  # what the command would create, run in the run folder
    for m in rep["models"]:
        if m["name"] == "teacher":
            m["path"] = "cmd:touch PWNED"
        if m["name"] == "student onnx fp32":
            m["path"] = "../../../../etc/hostname"
    (cur / "report.json").write_text(json.dumps(rep))
    (cur / "cmd:touch PWNED").write_text("junk")
    monkeypatch.chdir(cur)
    res = api.gate(".", b1, QUICK)
    assert not marker.exists()
    assert "re-timed here" in _latency(res, "teacher").detail  # the manifest's hash-checked teacher file, not the row's path
    assert "not a file inside the run directory" in _latency(res, "student onnx fp32").detail


def test_an_edited_marker_cannot_make_the_update_delete_a_users_file(runs, cli, tmp_path):
    from compressor._io import sha256_file

    run, b1, _ = runs
    b = tmp_path / "b"
    shutil.copytree(b1, b)
    (b / "gate.toml").write_text("rounds = 7\n")
    m = json.loads((b / "gate-baseline.json").read_text())
    m["files"]["gate.toml"] = sha256_file(b / "gate.toml")
    (b / "gate-baseline.json").write_text(json.dumps(m))
    code, _, _ = cli("gate", run, "--baseline", b, "--update-baseline", *QUICK_ARGS)
    assert code == 0 and (b / "gate.toml").read_text() == "rounds = 7\n"
