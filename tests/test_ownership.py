"""A run never harms what is around it: the tool writes only in folders it created or that carry its marker, replaces
only its own artifacts, sweeps only its own temporary names, and a second writer on the same run is turned away
(compressor/ownership.py). Each test reproduces a defect of issue 17, class 1."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from compressor.ownership import LOCK, claim_run_dir, run_lock, sweep_stale
from compressor.errors import CompressError
from conftest import make_finished_run


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory) -> Path:
    return make_finished_run(tiny, tmp_path_factory.mktemp("own") / "run", "jetson")


def _tree(root: Path) -> dict:
    """Every file below root with its bytes: what a test compares before and after a command."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name not in (LOCK, "compress.log")}


def test_bundle_force_never_deletes_a_folder_of_user_files(finished_run, tmp_path, cli):
    d = tmp_path / "D"
    (d / "x").mkdir(parents=True)
    (d / "x" / "f").write_text("hi")
    code, _, err = cli("bundle", finished_run, "--out", d, "--force")
    assert code == 2, err
    assert "not a deploy bundle folder" in err and err.count("\n") == 1
    assert (d / "x" / "f").read_text() == "hi"


@pytest.mark.parametrize("where", ["run", "parent"])
def test_bundle_out_at_the_run_or_above_it_is_refused(finished_run, cli, where):
    before = _tree(finished_run)
    out = finished_run if where == "run" else finished_run.parent
    code, _, err = cli("bundle", finished_run, "--out", out, "--force")
    assert code == 2 and "would replace the run" in err, err
    assert _tree(finished_run) == before


def test_bundle_force_replaces_its_own_bundle(finished_run, tmp_path, cli):
    out = tmp_path / "b"
    assert cli("bundle", finished_run, "--out", out)[0] == 0
    assert cli("bundle", finished_run, "--out", out)[0] == 2  # without --force: refused
    assert cli("bundle", finished_run, "--out", out, "--force")[0] == 0
    assert (out / "manifest.json").is_file()
    # what the device wrote there (its report.json, engines) or the user added is theirs: --force does not delete it
    (out / "report.json").write_text("device results")
    (out / "notes").mkdir()
    code, _, err = cli("bundle", finished_run, "--out", out, "--force")
    assert code == 2 and "holds files the bundle did not ship (notes, report.json)" in err, err
    assert (out / "report.json").read_text() == "device results" and (out / "notes").is_dir()


def test_bundle_force_leaves_a_tarball_it_did_not_write(finished_run, tmp_path, cli):
    out = tmp_path / "b2"
    tarball = tmp_path / "b2.tar.gz"
    tarball.write_bytes(b"my own archive")
    code, _, err = cli("bundle", finished_run, "--out", out, "--force")
    assert code == 2 and "not a bundle tarball" in err, err
    assert tarball.read_bytes() == b"my own archive"


def test_out_at_a_folder_of_user_files_is_refused_before_any_work(tiny, tmp_path, cli):
    work = tmp_path / "work"
    (work / "deep").mkdir(parents=True)
    (work / "report.md").write_text("mine")
    (work / "student.onnx").write_bytes(b"mine")
    (work / "deep" / ".keep.abcdef12.tmp").write_text("mine")
    before = _tree(work)
    t0 = time.perf_counter()
    code, _, err = cli("--teacher", tiny.torchscript, "--data", tiny.npz, "--out", work, "--steps", 1)
    assert code == 2 and "not a run folder" in err and "choose an empty or new --out" in err, err
    assert time.perf_counter() - t0 < 30
    assert _tree(work) == before and sorted(p.name for p in work.iterdir()) == ["deep", "report.md", "student.onnx"]


def test_a_stage_command_on_a_folder_that_is_not_a_run_writes_nothing(tmp_path, cli):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    for cmd in ("export", "quantize", "bench", "report", "bundle"):
        code, _, err = cli(cmd, work)
        assert code == 2, (cmd, err)
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]  # no compress.log, no run.lock


def test_out_inside_the_image_data_folder_is_refused(tmp_path, cli, tiny):
    from PIL import Image

    data = tmp_path / "imgs"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(data / c / f"{i}.png")
    before = _tree(data)
    for out in (data, data / "run"):
        code, _, err = cli("--teacher", tiny.torchscript, "--data", data, "--out", out)
        assert code == 2 and "inside the data folder" in err, err
    assert _tree(data) == before and sorted(p.name for p in data.iterdir()) == ["a", "b"]


def test_claim_accepts_new_empty_and_run_folders(tmp_path, finished_run):
    assert claim_run_dir(tmp_path / "new" / "deeper").is_dir()
    (tmp_path / "empty").mkdir()
    assert claim_run_dir(tmp_path / "empty") == tmp_path / "empty"
    assert claim_run_dir(finished_run) == finished_run
    (tmp_path / "file").write_text("x")
    with pytest.raises(CompressError, match="not a directory"):
        claim_run_dir(tmp_path / "file")


def test_the_sweep_removes_only_the_tools_temporaries_in_its_own_folders(finished_run):
    ours = [finished_run / ".student.onnx.k2j3h4g5.tmp", finished_run / "checkpoints" / ".student.ckpt.abc123.tmp"]
    scratch = finished_run / ".quantize-x8y7z6w5"  # what a SIGKILL during quantize leaves
    theirs = [finished_run / "notes" / ".draft.abcdef12.tmp", finished_run / ".notes.tmp", finished_run / "cache" / "mine.tmp"]
    (finished_run / "checkpoints").mkdir(exist_ok=True)
    (finished_run / "notes").mkdir()
    (scratch / "sub").mkdir(parents=True)
    (scratch / "sub" / "model.onnx").write_bytes(b"half")
    for p in ours + theirs:
        p.parent.mkdir(exist_ok=True)
        p.write_text("x")
    try:
        removed = sweep_stale(finished_run)
        assert sorted(removed) == sorted([*ours, scratch])
        assert all(p.exists() for p in theirs) and not scratch.exists()
    finally:
        shutil.rmtree(finished_run / "notes")
        for p in theirs:
            p.unlink(missing_ok=True)


def test_the_sweep_does_nothing_in_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "a").mkdir()
    f = tmp_path / "a" / ".x.abcdef12.tmp"
    f.write_text("x")
    (tmp_path / ".y.abcdef12.tmp").write_text("y")
    assert sweep_stale(tmp_path) == [] and f.exists() and (tmp_path / ".y.abcdef12.tmp").exists()


_HOLDER = """
import sys, time
from compressor.ownership import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_on_the_same_run_is_refused_until_the_first_is_gone(finished_run, cli):
    proc = _hold(finished_run)
    try:
        code, _, err = cli("report", finished_run)
        assert code == 2 and "in use by another compress process" in err and f"PID {proc.pid}" in err, err
        code, _, err = cli("export", finished_run, "--force")
        assert code == 2 and "in use" in err, err
    finally:
        proc.send_signal(signal.SIGKILL)  # even a killed holder releases the lock (flock)
        proc.wait()
    code, _, err = cli("report", finished_run)
    assert code == 0, err


def test_the_lock_is_reentrant_in_one_process(finished_run):
    with run_lock(finished_run):
        with run_lock(finished_run):
            pass
        assert (finished_run / LOCK).read_text().split()[0] == str(os.getpid())


@pytest.mark.parametrize("sub", ["cache", "checkpoints"])
def test_a_run_whose_own_folders_are_links_elsewhere_is_refused(finished_run, tmp_path, cli, sub, tiny):
    """A run folder that travelled (an artifact) must not steer the tool's writes into the user's folders."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns(LOCK))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("mine")
    if (run / sub).exists():
        shutil.rmtree(run / sub)
    (run / sub).symlink_to(victim, target_is_directory=True)
    for argv in (("export", run, "--force"), ("--teacher", tiny.torchscript, "--data", tiny.npz, "--out", run)):
        code, _, err = cli(*argv)
        assert code == 2 and "is a symbolic link" in err, err
    assert sorted(p.name for p in victim.iterdir()) == ["keep"]


def test_a_stage_command_on_an_empty_folder_leaves_it_empty(tmp_path, cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    for cmd in ("export", "report", "bench", "bundle"):
        assert cli(cmd, empty)[0] == 2
    assert list(empty.iterdir()) == []


def test_a_symlink_loop_as_run_folder_or_out_is_exit_2(tmp_path, cli, tiny):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for argv in (("export", loop), ("bundle", tmp_path, "--out", loop), ("--teacher", tiny.torchscript, "--data", tiny.npz, "--out", loop)):
        code, _, err = cli(*argv)
        assert code == 2 and "internal error" not in err, (argv, err)


@pytest.mark.parametrize("out", [".", ""])
def test_bundle_out_dot_or_empty_is_the_working_folder_and_refused_when_it_holds_files(finished_run, tmp_path, cli, monkeypatch, out):
    (tmp_path / "mine.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("bundle", finished_run, f"--out={out}", "--force")
    assert code == 2 and "not a deploy bundle folder" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_messages_with_non_utf8_paths_are_logged_without_a_logging_error(finished_run, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns(LOCK))
    code, out, err = cli("bundle", run, "--out", tmp_path / os.fsdecode(b"b-\xff\xfe"))
    assert code == 0 and "Logging error" not in err and "Traceback" not in err, err
    assert "\\udcff" in (run / "compress.log").read_text(encoding="utf-8")


def test_fp16_io_flag_quantizes_benches_and_bundles(finished_run, tmp_path, cli):
    """`compress quantize --fp16-io` fed float32 to a float16-input model and crashed (exit 1) before any FP16 file was kept."""
    import onnxruntime as ort

    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns(LOCK, "bundle-*"))
    code, _, err = cli("quantize", run, "--fp16", "--fp16-io", "--force")
    assert code == 0, err
    assert ort.InferenceSession(str(run / "student.fp16.onnx")).get_inputs()[0].type == "tensor(float16)"
    code, _, err = cli("bench", run, "--force", "--min-runs", 3, "--min-duration", 0.01, "--repeat", 1)
    assert code == 0, err
    import json

    rows = {m["name"]: m for m in json.loads((run / "report.json").read_text())["models"]}
    fp16 = [m for n, m in rows.items() if "fp16" in n]
    assert fp16 and all(m["accuracy"] > 0.5 for m in fp16), rows.keys()


@pytest.mark.parametrize("baseline", ["", "."])
def test_update_baseline_never_writes_among_the_users_files(finished_run, tmp_path, cli, monkeypatch, baseline):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("gate", finished_run, f"--baseline={baseline}", "--update-baseline")
    assert code == 2 and "holds files the tool did not write" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("argv, resumable", [(["export", "r"], False), (["-q", "bench", "r"], False), (["distill", "--out", "r"], True),
                                             (["--teacher", "t.pt"], True), (["--debug", "run"], True), (["gate", "a"], False)])
def test_the_resume_hint_is_printed_only_where_resume_exists(monkeypatch, argv, resumable):
    import compressor.cli as c

    monkeypatch.setattr(c, "_ARGV", argv)
    assert c._resumable() is resumable


def _special(kind: str, p: Path, victim: Path) -> None:
    if kind == "symlink":
        p.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, p)
    elif kind == "fifo":
        os.mkfifo(p)
    else:
        p.mkdir()


# a hard-linked student.onnx is harmless (replaced by rename); the log and the lock are written in place
@pytest.mark.parametrize("name, kind", [(n, k) for n in ("compress.log", "run.lock", "student.onnx") for k in ("symlink", "hardlink", "fifo", "folder")
                                        if not (n == "student.onnx" and k in ("hardlink", "folder"))])
def test_links_and_special_files_in_a_run_are_refused_and_never_written_through(finished_run, tmp_path, cli, name, kind):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns(LOCK, "bundle-*"))
    victim = tmp_path / "victim.txt"
    victim.write_text("USER DATA")
    (run / name).unlink(missing_ok=True)
    _special(kind, run / name, victim)
    import signal as _signal

    def _hang(*_):
        raise TimeoutError("hung")

    old = _signal.signal(_signal.SIGALRM, _hang)
    _signal.alarm(60)
    try:
        for argv in (("export", run, "--force"), ("quantize", run, "--force"), ("report", run)):
            code, _, err = cli(*argv)
            assert code == 2 and err.count("\n") == 1 and "internal error" not in err, (argv, err)
    finally:
        _signal.alarm(0)
        _signal.signal(_signal.SIGALRM, old)
    assert victim.read_text() == "USER DATA"


def test_text_from_files_never_reaches_the_terminal_as_escapes_or_markup(tmp_path, cli, capsys):
    """A profile description or a report note holding ESC sequences (window title, clear screen) or Rich markup
    ('[/b]' crashed the table with MarkupError; '[link=…]' made a live link) is printed as text."""
    import json

    from compressor.bench.report import print_table, load_report
    rep = load_report(Path(__file__).resolve().parent / "data" / "report.json")
    hostile = "Orin [/b] \x1b]0;PWNED\x07\x1b[2J [link=https://evil.example]x[/link]"
    rep["target"]["latency_note"] = hostile
    rep.setdefault("notes", ["first"]).append("closing [/bogus] tag \x1b[31m")
    print_table(rep)
    out = capsys.readouterr().out
    assert "\x1b]0;" not in out and "\x1b[2J" not in out and "[/bogus]" in out and "[/b]" in out
    src = (Path(__file__).resolve().parent.parent / "targets" / "cpu.toml").read_text()
    prof = tmp_path / "evil.toml"
    prof.write_text(src.replace('name = "cpu"', 'name = "evil"', 1).replace("description = ", 'description = "\\u001b]0;T\\u0007 [/x]" #', 1))
    code, out, err = cli("targets", prof, "--text")
    assert code == 0 and "\x1b" not in out + err and "\\x1b]0;T" in out, out


@pytest.mark.parametrize("flag", ["--junit", "--markdown"])
def test_gate_summaries_never_overwrite_the_gates_inputs(finished_run, tmp_path, cli, flag):
    base = tmp_path / "base.json"
    shutil.copyfile(finished_run / "report.json", base)
    before = base.read_bytes()
    for current, target in ((finished_run / "report.json", base), (finished_run / "report.json", finished_run / "report.json"),
                            (finished_run, finished_run / "manifest.json"), (finished_run, finished_run / "report.md")):
        code, _, err = cli("gate", current, "--baseline", base, "--absolute-latency", flag, target)
        assert code == 2 and "one of the gate's inputs" in err, err
    assert base.read_bytes() == before
    code, _, err = cli("gate", finished_run, "--baseline", base, "--absolute-latency", flag, finished_run / "gate.out")
    assert code == 0 and (finished_run / "gate.out").is_file(), err  # a new summary file inside the run is fine (CI keeps it there)
    (finished_run / "gate.out").unlink()


@pytest.mark.parametrize("kind", ["folder", "missing-parent", "fifo"])
def test_a_bad_github_step_summary_is_a_warning_not_the_gates_exit_code(finished_run, tmp_path, cli, monkeypatch, kind):
    base = tmp_path / "base.json"
    shutil.copyfile(finished_run / "report.json", base)
    target = tmp_path / "summary"
    if kind == "folder":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target = tmp_path / "nope" / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    code, _, err = cli("gate", finished_run / "report.json", "--baseline", base, "--absolute-latency")
    assert code == 0 and "cannot append the summary" in err, err


@pytest.mark.parametrize("what", ["teacher", "data"])
def test_a_typo_in_teacher_or_data_leaves_no_out_folder_behind(tiny, tmp_path, cli, what):
    out = tmp_path / "newout"
    teacher = tmp_path / "nope.pt" if what == "teacher" else tiny.torchscript
    data = tmp_path / "nope.npz" if what == "data" else tiny.npz
    code, _, err = cli("--teacher", teacher, "--data", data, "--out", out, "--skip-preflight")
    assert code == 2 and "does not exist" in err, err
    assert not out.exists()


def test_later_stages_refuse_data_that_changed_or_moved(finished_run, tmp_path, cli, monkeypatch):
    """bench used to score the student on whatever file the recorded (relative) data path named now: silent wrong data."""
    import json

    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns(LOCK, "bundle-*"))
    m = json.loads((run / "manifest.json").read_text())
    src = Path(m["config"]["data"]["source"])
    assert src.is_absolute()
    data = tmp_path / "data.npz"
    shutil.copyfile(src, data)
    m["config"]["data"]["source"] = str(data)
    (run / "manifest.json").write_text(json.dumps(m))
    with np.load(data) as z:
        arrays = dict(z)
    arrays["y_test"] = arrays["y_test"][::-1].copy()
    np.savez(data, **arrays)
    code, _, err = cli("bench", run, "--force", "--min-runs", 3, "--min-duration", 0.01, "--repeat", 1)
    assert code == 2 and "changed since this run started" in err, err
    data.unlink()
    code, _, err = cli("export", run, "--force")
    assert code == 2 and "no longer exists" in err, err


def test_the_hidden_distill_worker_refuses_to_run_outside_torchrun(finished_run, cli, monkeypatch):
    for k in ("LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    code, _, err = cli("distill-worker", finished_run)
    assert code == 2 and "not by hand" in err, err


def test_usage_errors_show_control_characters_in_a_bad_value(cli):
    code, _, err = cli("bench", "r", "--threads", "\x1b]0;PWNED\x07")
    assert code == 2 and "\x1b" not in err and "\\x1b]0;PWNED" in err, err
