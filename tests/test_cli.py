"""The `compress` command as a user meets it: fast --help, one-line errors with documented exit codes,
the target list, and the pipeline end to end followed by `compress bench` and `compress report`."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import run_cli


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


# --- fast paths ---------------------------------------------------------------------------------
def test_help_is_fast_and_imports_no_heavy_library():
    code = ("import sys, compressor.cli\n"
            "rc = compressor.cli.main(['--help'])\n"
            "print('RC', rc, 'torch' in sys.modules, 'onnxruntime' in sys.modules, 'onnx' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: compress" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "RC 0 False False False", proc.stdout[-500:]
    for cmd in ("distill", "export", "quantize", "bench", "report", "bundle", "gate", "targets"):
        assert cmd in proc.stdout


@pytest.mark.parametrize("sub", ["run", "distill", "export", "quantize", "bench", "report", "bundle", "gate", "targets"])
def test_every_command_has_help(cli, sub):
    code, out, _ = cli(sub, "--help")
    assert code == 0 and f"Usage: compress {sub}" in out


def test_run_help_lists_the_pipeline_options(cli):
    code, out, _ = cli("run", "--help")
    assert code == 0
    for opt in ("--teacher", "--teacher-arch", "--trust", "--data", "--student", "--target", "--steps", "--out"):
        assert opt in out


def test_targets_lists_every_profile(cli):
    from compressor.targets import list_targets

    code, out, _ = cli("targets")
    assert code == 0
    for p in list_targets():
        assert p["name"] in out, p["name"]  # in full: never cut with an ellipsis
        for a in p.get("aliases", []):
            assert a in out


def test_targets_piped_lists_every_full_name():
    proc = run_cli("targets", env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    for name in ("cpu", "jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb"):
        assert name in proc.stdout


def test_targets_shows_one_profile_as_json(cli):
    code, out, _ = cli("targets", "jetson")
    assert code == 0 and json.loads(out)["name"] == "jetson-orin-nano-8gb"


# --- errors: one line, the right exit code ----------------------------------------------------------
def test_unknown_target_suggests_the_name(cli, tiny, tmp_path):
    code, out, err = cli("--teacher", tiny.torchscript, "--data", tiny.npz, "--target", "jetsn", "--out", tmp_path / "r")
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith("error:") and "Did you mean 'jetson'" in line
    assert not (tmp_path / "r").exists(), "a typo must fail before anything is created"


def test_unknown_target_in_a_real_process(tiny, tmp_path):
    proc = run_cli("--target", "jetsn", "--teacher", tiny.torchscript, "--data", tiny.npz, "--out", tmp_path / "r")
    assert proc.returncode == 2
    assert "Did you mean 'jetson'" in _one_error_line(proc.stderr)


def test_missing_teacher_in_a_real_process(tiny, tmp_path):
    proc = run_cli("--teacher", tmp_path / "nope.pt", "--data", tiny.npz, "--out", tmp_path / "r")
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert line.startswith("error:") and "nope.pt" in line and "does not exist" in line


def test_pickled_teacher_without_trust(cli, tiny, tmp_path):
    code, _, err = cli("--teacher", tiny.pickled, "--data", tiny.npz, "--steps", 2, "--out", tmp_path / "r")
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith("error:") and "--trust" in line


def test_state_dict_without_arch(cli, tiny, tmp_path):
    code, _, err = cli("--teacher", tiny.state_dict, "--data", tiny.npz, "--steps", 2, "--out", tmp_path / "r")
    assert code == 2 and "--teacher-arch" in _one_error_line(err)


def test_data_without_teacher(cli, tiny, tmp_path):
    code, _, err = cli("--data", tiny.npz, "--out", tmp_path / "r")
    assert code == 2 and "--teacher" in _one_error_line(err)


def test_bad_data_file(cli, tiny, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage" * 50)
    code, _, err = cli("--teacher", tiny.torchscript, "--data", bad, "--steps", 2, "--out", tmp_path / "r")
    assert code == 2 and _one_error_line(err).startswith("error:")


@pytest.mark.parametrize("spec,msg", [
    ("{dir}/missing.py:build", "does not exist"),
    ("{student}:boom", "factory exploded"),
    ("{student}:not_a_module", "not a torch.nn.Module"),
    ("{student}:nope", "not a callable"),
    ("nocolon", "file.py:factory"),
])
def test_bad_student_spec(cli, tiny, tmp_path, spec, msg):
    spec = spec.format(dir=tmp_path, student=tiny.student_file)
    code, _, err = cli("-q", "--teacher", tiny.torchscript, "--data", tiny.npz, "--student", spec, "--steps", 2,
                       "--out", tmp_path / "r")
    assert code == 2, err
    line = _one_error_line(err)
    assert line.startswith("error:") and "--student" in line and msg in line


def test_student_with_wrong_output_shape(cli, tiny, tmp_path):
    f = tmp_path / "wrong_student.py"
    f.write_text("import torch.nn as nn\ndef build(input_shape):\n    return nn.Linear(input_shape[0], 7)\n")
    code, _, err = cli("-q", "--teacher", tiny.torchscript, "--data", tiny.npz, "--student", f"{f}:build", "--steps", 2,
                       "--out", tmp_path / "r")
    assert code == 2 and "expected (batch, 3)" in _one_error_line(err)


@pytest.mark.parametrize("cmd", ["export", "quantize", "bench", "report"])
def test_stage_on_a_directory_without_manifest(cli, tmp_path, cmd):
    code, _, err = cli(cmd, tmp_path)
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith("error:") and "manifest.json" in line


def test_stage_on_a_directory_with_a_damaged_manifest(cli, tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    code, _, err = cli("export", tmp_path)
    assert code == 2 and "manifest" in _one_error_line(err)


def test_bad_option_value_is_a_usage_error(cli, tiny, tmp_path):
    code, _, err = cli("--teacher", tiny.torchscript, "--steps", 0, "--out", tmp_path / "r")
    assert code == 2 and "--steps" in err and "Traceback" not in err
    code, _, err = cli("--image-size", "32", "--out", tmp_path / "r")
    assert code == 2 and "--image-size" in err


def test_bench_help_says_which_ssh_options_are_refused_and_where_they_go(cli):
    from compressor.remote import LOCAL_CODE_OPTIONS

    code, out, _ = cli("bench", "--help")
    text = " ".join(out.split())
    assert code == 0 and "~/.ssh/config" in text
    assert all(k in text for k in LOCAL_CODE_OPTIONS)


def test_out_that_is_a_file(cli, tiny, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    code, _, err = cli("--teacher", tiny.torchscript, "--data", tiny.npz, "--out", f)
    assert code == 2 and "not a directory" in _one_error_line(err)


# --- end to end -------------------------------------------------------------------------------------
def test_cli_end_to_end_then_bench_and_report(cli, tiny, tmp_path):
    import torch

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    # the pipeline in this process (torch is already imported); the later stages as separate commands
    code, stdout, err = cli("--teacher", tiny.torchscript, "--data", tiny.npz, "--student", tiny.student, "--target", "jetson",
                            "--out", out, "--steps", 40, "--no-baseline")
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and "error" not in err.lower()
    assert "report.json" in stdout and "student onnx int8" in stdout  # the table and where the report is
    assert torch.get_num_threads() == threads, "benchmarking must not change the caller's torch thread count"
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done" for s in ("distill", "export", "quantize", "bench", "report"))
    assert manifest["stages"]["distill"]["result"]["student_record"]["spec"] == tiny.student
    assert "baseline" not in manifest["stages"]["distill"]["outputs"]
    assert (out / "compress.log").is_file()

    proc = run_cli("bench", out, "--min-runs", 5, "--min-duration", 0.01, "--threads", 1, "--force")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["configs"]["bench"]["min_runs"] == 5 and rep["configs"]["bench"]["threads"] == 1
    assert all(m["latency_ms"].get("runs", 5) >= 5 for m in rep["models"])

    (out / "report.md").unlink()
    proc = run_cli("report", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "report.md").read_text()
    names = [m["name"] for m in rep["models"]]
    assert set(names) == {"teacher", "student", "student onnx fp32", "student onnx fp16", "student onnx int8"}  # the jetson target takes fp16
    for n in names:
        assert f"| {n} |" in md, n
    assert "jetson-orin-nano-8gb" in md and rep["target"]["latency_note"] in md
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_distill_then_stages_one_by_one(cli, tiny, tmp_path):
    out = tmp_path / "run"
    code, out_text, err = cli("-q", "distill", "--teacher", tiny.torchscript, "--data", tiny.npz, "--student", tiny.student,
                              "--target", "cpu", "--out", out, "--steps", 10)
    assert code == 0, err
    assert (out / "student.pt").is_file() and not (out / "student.onnx").exists()
    code, _, err = cli("quantize", out)
    assert code == 2 and "export" in _one_error_line(err), "quantize before export must say to export first"
    code, _, err = cli("-q", "export", out, "--opset", 17)
    assert code == 0, err
    assert (out / "student.onnx").is_file()
    code, _, err = cli("-q", "quantize", out, "--recipe", "cpu-s8s8", "--calibration-rows", 32)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["stages"]["quantize"]["result"]["recipe"] == "cpu-s8s8"
    assert m["stages"]["quantize"]["result"]["calibration_rows"] == 32
    code, _, err = cli("quantize", out, "--recipe", "tensorrtt", "--force")
    assert code == 2 and "Did you mean 'tensorrt'" in _one_error_line(err)


def test_group_flags_may_precede_the_implicit_run_command(cli, tiny, tmp_path):
    """`compress --debug --teacher ...` and `compress -q targets` (the README advertises --debug)."""
    code, _, err = cli("--debug", "--teacher", tiny.torchscript, "--data", tiny.npz, "--target", "jetsn", "--out", tmp_path / "r")
    assert code == 2, err
    assert "Traceback" in err, "--debug shows the traceback"
    assert err.strip().splitlines()[-1].startswith("error: unknown target 'jetsn'")
    code, out, _ = cli("-q", "targets")
    assert code == 0 and "jetson-orin-nano-8gb" in out
