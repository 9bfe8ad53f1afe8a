"""Bad input and bad luck at run time: a full disk, an unwritable --out, out of GPU memory, a NaN loss, an
operation ONNX cannot export, a kill during export. Each is one line on stderr, a documented exit code,
and nothing half-written."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor import api
from compressor.config import CompressConfig, DataConfig, DistillConfig
from compressor.errors import CompressError


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), lines[0]
    return lines[0]


def _temps(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def distilled(tiny, tmp_path_factory) -> Path:
    """A run directory whose distill stage has finished (tiny student, a few steps)."""
    out = tmp_path_factory.mktemp("rel") / "run"
    api.distill(CompressConfig(teacher=str(tiny.torchscript), data=DataConfig(source=str(tiny.npz)), target="cpu",
                               distill=DistillConfig(student=tiny.student, steps=20, evals=2, baseline=False, device="cpu")), out)
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --- every bad input through the CLI: one line, exit 2, a message that names the problem ------------------------
def _png(path: Path, value: int = 100, size=(8, 4)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, np.uint8), "L").save(path)


def _image_folder(root: Path, classes=("a", "b"), n=3) -> Path:
    for ci, c in enumerate(classes):
        for i in range(n):
            _png(root / c / f"{i}.png", 40 + 100 * ci + i)
    return root


def _npz(tmp: Path, tiny, **change) -> Path:
    arrays = dict(x=tiny.x, y=tiny.y, x_test=tiny.x_test, y_test=tiny.y_test)
    arrays.update(change)
    p = tmp / "data.npz"
    np.savez(p, **arrays)
    return p


def _bytes(tmp: Path, name: str, blob: bytes) -> Path:
    p = tmp / name
    p.write_bytes(blob)
    return p


def _image_teacher(tmp: Path, classes: int) -> Path:
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, classes)).eval()  # 1x4x8 images
    p = tmp / "image_teacher.pt"
    torch.jit.save(torch.jit.script(m), str(p))
    return p


def _x_with(tiny, value) -> np.ndarray:
    x = tiny.x.copy()
    x[7, 3] = value
    return x


# case -> (build {option: value} from (tiny, tmp), a fragment of the one error line)
BAD_INPUTS = {
    "teacher-missing": (lambda t, d: {"--teacher": d / "nope.pt"}, "does not exist"),
    "teacher-empty": (lambda t, d: {"--teacher": _bytes(d, "empty.pt", b"")}, "is empty"),
    "teacher-truncated": (lambda t, d: {"--teacher": _bytes(d, "cut.pt", t.torchscript.read_bytes()[:3000])}, "teacher"),
    "teacher-random-bytes": (lambda t, d: {"--teacher": _bytes(d, "rnd.pt", np.random.default_rng(0).bytes(5000))}, "not a model file"),
    "teacher-is-data": (lambda t, d: {"--teacher": t.npz}, "not a model file"),
    "teacher-pickled-without-trust": (lambda t, d: {"--teacher": t.pickled}, "--trust"),
    "teacher-state-dict-without-arch": (lambda t, d: {"--teacher": t.state_dict}, "--teacher-arch"),
    "teacher-classes-fewer-than-labels": (lambda t, d: {"--data": _npz(d, t, y=np.where(t.y == 2, 5, t.y))}, "labels go up to 5 but the teacher has 3 classes"),
    "teacher-classes-differ-from-folder": (lambda t, d: {"--teacher": _image_teacher(d, 5), "--data": _image_folder(d / "imgs")},
                                           "the image folder has 2 classes but the teacher has 5"),
    "data-missing": (lambda t, d: {"--data": d / "nope.npz"}, "does not exist"),
    "data-empty": (lambda t, d: {"--data": _bytes(d, "empty.npz", b"")}, "is empty"),
    "data-truncated": (lambda t, d: {"--data": _bytes(d, "cut.npz", t.npz.read_bytes()[:5000])}, "npz"),
    "data-random-bytes": (lambda t, d: {"--data": _bytes(d, "rnd.npz", np.random.default_rng(0).bytes(5000))}, "not a readable .npz"),
    "data-is-teacher": (lambda t, d: {"--data": t.torchscript}, "is a PyTorch model file, not data"),
    "data-shape-does-not-fit-teacher": (lambda t, d: {"--data": _npz(d, t, x=t.x[:, :20], x_test=t.x_test[:, :20])}, "cannot run on data of shape (20,): RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    "data-x-integer-dtype": (lambda t, d: {"--data": _npz(d, t, x=(t.x * 10).astype(np.int32))}, "integer dtype"),
    "data-y-float-dtype": (lambda t, d: {"--data": _npz(d, t, y=t.y.astype(np.float32))}, "integer array"),
    "data-labels-below-minus-one": (lambda t, d: {"--data": _npz(d, t, y=np.where(t.y == 0, -3, t.y))}, "below -1"),
    "data-nan": (lambda t, d: {"--data": _npz(d, t, x=_x_with(t, np.nan))}, "NaN or Inf values in 1 rows"),
    "data-inf": (lambda t, d: {"--data": _npz(d, t, x=_x_with(t, np.inf))}, "NaN or Inf values in 1 rows"),
    "data-no-labeled-rows": (lambda t, d: {"--data": _npz(d, t, y=np.full_like(t.y, -1))}, "no labeled rows"),
    "folder-no-class-folders": (lambda t, d: {"--data": (d / "none").mkdir() or d / "none"}, "no class sub-folders"),
    "folder-no-images": (lambda t, d: {"--data": (d / "f" / "a").mkdir(parents=True) or (d / "f" / "a" / "x.txt").write_text("x") and d / "f"},
                         "has no images"),
    "folder-unreadable-image": (lambda t, d: {"--teacher": _image_teacher(d, 2),
                                              "--data": _bytes(_image_folder(d / "imgs") / "b", "bad.png", b"\x89PNG broken").parent.parent},
                                "cannot read image"),
    "target-unknown": (lambda t, d: {"--target": "jetsonn"}, "Did you mean 'jetson'"),
    "target-file-invalid": (lambda t, d: {"--target": _bytes(d, "mine.toml", b"name = 3\n")}, "target profile"),
    "student-file-missing": (lambda t, d: {"--student": f"{d}/missing.py:build"}, "does not exist"),
    "student-factory-raises": (lambda t, d: {"--student": f"{t.student_file}:boom"}, "raised RuntimeError: factory exploded"),
    "student-not-a-module": (lambda t, d: {"--student": f"{t.student_file}:not_a_module"}, "not a torch.nn.Module"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(cli, tiny, tmp_path, case):
    make, fragment = BAD_INPUTS[case]
    opts = {"--teacher": tiny.torchscript, "--data": tiny.npz, "--target": "cpu"}
    opts.update(make(tiny, tmp_path))
    args = [a for kv in opts.items() for a in kv]
    out = tmp_path / "run"
    code, _, err = cli("-q", "distill", *args, "--steps", 2, "--no-baseline", "--out", out)
    assert code == 2, err
    line = one_error_line(err)
    assert fragment in line, line
    assert not (out / "student.pt").exists() and not _temps(tmp_path)
    if (out / "compress.log").exists() and out.joinpath("manifest.json").exists():
        assert "Traceback" in (out / "compress.log").read_text(), "the run's log keeps the full trace"


# --- parse-time ranges, manifests of the wrong shape, special files, remote options: exit 2, never 1 or a hang -------
class _Hung(BaseException):
    """Raised by the guard's alarm: a BaseException, so compressor.cli.main cannot turn it into an exit code."""


@contextlib.contextmanager
def _guard(seconds: int = 30, extra_bytes: int = 3 << 30):
    """Fail (never hang, never eat the machine's memory) when a read blocks on a FIFO or runs on through /dev/zero:
    an alarm raises _Hung, and the address space may grow by extra_bytes at most (a MemoryError, exit 1)."""
    import resource

    def _alarm(signum, frame):
        raise _Hung(f"still running after {seconds} s: a read blocked")

    old_handler = signal.signal(signal.SIGALRM, _alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = int(next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmSize:")).split()[1]) * 1024
    limit = vm + extra_bytes if hard == resource.RLIM_INFINITY else min(hard, vm + extra_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, old_handler)


def _fifo(d: Path, name: str) -> Path:
    p = d / name
    os.mkfifo(p)
    return p


def _manifest_run(distilled: Path, d: Path, change) -> Path:
    """A copy of a finished distill run whose manifest.json was changed by change(manifest)."""
    run = _copy_run(distilled, d / "run-m")
    m = json.loads((run / "manifest.json").read_text())
    m = change(m)
    (run / "manifest.json").write_text(m if isinstance(m, str) else json.dumps(m))
    return run


def _set(m: dict, path: str, value) -> dict:
    *keys, last = path.split(".")
    node = m
    for k in keys:
        node = node[k]
    node[last] = value
    return m


def _run_with_report(distilled: Path, d: Path) -> Path:
    run = _copy_run(distilled, d / "run-r")
    (run / "report.json").write_bytes((Path(__file__).parent / "data" / "report.json").read_bytes())
    return run


_DISTILL = lambda t, d: ["distill", "--teacher", t.torchscript, "--data", t.npz, "--target", "cpu", "--steps", 2, "--no-baseline",  # noqa: E731
                         "--out", d / "out"]
# case -> (argv from (tiny, tmp, distilled run), a fragment of stderr)
EXIT_2_CASES = {
    "seed-negative": (lambda t, d, r: [*_DISTILL(t, d), "--seed", "-1"], "--seed"),
    "seed-too-large": (lambda t, d, r: [*_DISTILL(t, d), "--seed", str(2**64)], "--seed"),
    "std-inf": (lambda t, d, r: [*_DISTILL(t, d), "--std", "inf"], "not a finite number"),
    "std-nan": (lambda t, d, r: [*_DISTILL(t, d), "--std", "nan"], "not a finite number"),
    "std-zero": (lambda t, d, r: [*_DISTILL(t, d), "--std", "0"], "std must be > 0"),
    "std-negative": (lambda t, d, r: [*_DISTILL(t, d), "--std", "0.5,-0.2,0.5"], "std must be > 0"),
    "mean-nan": (lambda t, d, r: [*_DISTILL(t, d), "--mean", "nan"], "not a finite number"),
    "mean-inf": (lambda t, d, r: [*_DISTILL(t, d), "--mean", "0.5,inf,0.5"], "not a finite number"),
    "mean-four-values": (lambda t, d, r: [*_DISTILL(t, d), "--mean", "0.1,0.2,0.3,0.4"], "at most 3"),
    "mean-count-vs-channels": (lambda t, d, r: [*_DISTILL(t, d), "--channels", "1", "--mean", "0.1,0.2,0.3"], "--channels 1"),
    "mean-count-vs-std-count": (lambda t, d, r: [*_DISTILL(t, d), "--mean", "0.1,0.2", "--std", "0.1,0.2,0.3"], "--mean has 2 values but --std has 3"),
    "image-size-zero": (lambda t, d, r: [*_DISTILL(t, d), "--image-size", "0x5"], "--image-size"),
    "image-size-huge": (lambda t, d, r: [*_DISTILL(t, d), "--image-size", "100000x100000"], "--image-size"),
    "epochs-inf": (lambda t, d, r: [*_DISTILL(t, d), "--epochs", "inf"], "--epochs"),
    "lr-nan": (lambda t, d, r: [*_DISTILL(t, d), "--lr", "nan"], "--lr"),
    "mixup-inf": (lambda t, d, r: [*_DISTILL(t, d), "--mixup", "inf"], "--mixup"),
    "int8-tolerance-nan": (lambda t, d, r: [*_DISTILL(t, d), "--int8-tolerance", "nan"], "--int8-tolerance"),
    "batch-size-huge": (lambda t, d, r: [*_DISTILL(t, d), "--batch-size", str(2**63)], "--batch-size"),
    "threads-huge": (lambda t, d, r: ["bench", r, "--threads", str(2**40)], "--threads"),
    "min-duration-nan": (lambda t, d, r: ["bench", r, "--min-duration", "nan"], "--min-duration"),
    "batch-sweep-zero": (lambda t, d, r: ["bench", r, "--batch-sweep", "0,8"], "--batch-sweep"),
    "atol-inf": (lambda t, d, r: ["export", r, "--atol", "inf"], "--atol"),
    "gate-max-accuracy-drop-nan": (lambda t, d, r: ["gate", r, "--baseline", r, "--max-accuracy-drop", "nan"], "--max-accuracy-drop"),
    "manifest-config-list": (lambda t, d, r: ["export", _manifest_run(r, d, lambda m: {"manifest_version": 1, "config": []})],
                             "not a manifest of this tool"),
    "manifest-config-wrong-type": (lambda t, d, r: ["export", _manifest_run(r, d, lambda m: _set(m, "config.distill.steps", "ten"))],
                                   "DistillConfig: steps must be an integer"),
    "manifest-config-nan": (lambda t, d, r: ["export", _manifest_run(r, d, lambda m: _set(m, "config.distill.lr", float("nan")))],
                            "DistillConfig: lr must be a finite number"),
    "manifest-config-target-list": (lambda t, d, r: ["export", _manifest_run(r, d, lambda m: _set(m, "config.target", ["cpu"]))],
                                    "CompressConfig: target must be a string"),
    "manifest-stages-list": (lambda t, d, r: ["export", _manifest_run(r, d, lambda m: _set(m, "stages", []))], "'stages' is list"),
    "manifest-stage-not-object": (lambda t, d, r: ["export", _manifest_run(r, d, lambda m: _set(m, "stages.distill", "done"))],
                                  "stage 'distill' is str"),
    "manifest-outputs-not-paths": (lambda t, d, r: ["export", _manifest_run(r, d, lambda m: _set(m, "stages.distill.outputs", {"student": 3}))],
                                   "'outputs' must map names"),
    "manifest-inputs-missing": (lambda t, d, r: ["bundle", _manifest_run(r, d, lambda m: {k: v for k, v in m.items() if k != "inputs"})],
                                "'inputs' is missing"),
    "target-fifo": (lambda t, d, r: [*_DISTILL(t, d)[:-2], "--target", _fifo(d, "board.toml"), "--out", d / "out"], "not a regular file (a FIFO)"),
    "target-dev-zero": (lambda t, d, r: [*_DISTILL(t, d)[:-2], "--target", "/dev/zero", "--out", d / "out"], "not a regular file (a device)"),
    "target-fifo-shown": (lambda t, d, r: ["targets", _fifo(d, "board.toml")], "not a regular file (a FIFO)"),
    "data-fifo": (lambda t, d, r: [*_DISTILL(t, d), "--data", _fifo(d, "data.npz")], "not a regular file"),
    "merge-fifo": (lambda t, d, r: ["report", _run_with_report(r, d), "--merge", _fifo(d, "device.json")], "not a regular file (a FIFO)"),
    "merge-dev-zero": (lambda t, d, r: ["report", _run_with_report(r, d), "--merge", "/dev/zero"], "not a regular file (a device)"),
    "remote-host-newline": (lambda t, d, r: ["bench", r, "--remote", "pi@host\n"], "is not a host"),
    "remote-host-space": (lambda t, d, r: ["bench", r, "--remote", "pi@host -oProxyCommand=x"], "is not a host"),
    "remote-dir-newline": (lambda t, d, r: ["bench", r, "--remote", "pi@host", "--remote-dir", "/tmp/a\n/tmp/b"], "--remote-dir"),
    "remote-dir-control": (lambda t, d, r: ["bench", r, "--remote", "pi@host", "--remote-dir", "/tmp/a\x1b[2J"], "control character"),
    "ssh-option-proxycommand": (lambda t, d, r: ["bench", r, "--remote", "pi@host", "--ssh-option", "ProxyCommand=touch /tmp/pwned"],
                                "~/.ssh/config"),
    "ssh-option-localcommand-any-case": (lambda t, d, r: ["bench", r, "--remote", "pi@host", "--ssh-option", "permitlocalcommand=yes",
                                                          "--ssh-option", "localcommand=id"], "refused"),
}


@pytest.mark.parametrize("case", list(EXIT_2_CASES))
def test_parse_time_and_special_file_errors_are_exit_2(cli, tiny, distilled, tmp_path, case):
    """Each was exit 1 (an internal error), a hang, or a silent acceptance: now exit 2 with one error line (ours) or
    click's usage error naming the option, no traceback; nothing in the distilled run is changed."""
    make, fragment = EXIT_2_CASES[case]
    run = _copy_run(distilled, tmp_path / "run")
    before = (run / "manifest.json").read_bytes()
    argv = make(tiny, tmp_path, run)
    with _guard():
        code, out, err = cli("-q", *argv)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if lines[0].startswith("error:"):
        assert len(lines) == 1, err
    else:  # click's usage error: (Usage:, Try ...,) Error: naming the option
        assert lines[-1].startswith("Error:") and all(ln.startswith(("Usage:", "Try ")) for ln in lines[:-1]), err
    assert fragment in err, err
    assert (run / "manifest.json").read_bytes() == before
    assert not (tmp_path / "out" / "student.pt").exists()
    if case.startswith("ssh-option"):
        assert not Path("/tmp/pwned").exists()


def test_read_regular_file_refuses_what_is_not_a_small_regular_file(tmp_path):
    from compressor._io import read_regular_file

    (tmp_path / "ok.toml").write_bytes(b"x = 1\n")
    assert read_regular_file(tmp_path / "ok.toml", "profile", 6) == b"x = 1\n"
    cases = {tmp_path / "ok.toml": "is larger than 5 bytes", tmp_path: "is a folder", tmp_path / "nope": "does not exist",
             _fifo(tmp_path, "fifo"): "not a regular file (a FIFO)", Path("/dev/zero"): "not a regular file (a device)"}
    for path, fragment in cases.items():
        with _guard(10), pytest.raises(CompressError, match=re.escape(fragment)) as info:
            read_regular_file(path, "profile", 5, hint="pass a profile")
        assert str(info.value).startswith(f"profile {path} ") and str(info.value).endswith("(pass a profile)")
    os.symlink(tmp_path / "fifo", tmp_path / "link.toml")  # a link is followed: to a FIFO, refused all the same
    with _guard(10), pytest.raises(CompressError, match="FIFO"):
        read_regular_file(tmp_path / "link.toml", "profile", 5)
    # the readers that route through it, called directly (the CLI checks other things first for these)
    from compressor.models import load_teacher
    from compressor.run import Run

    (tmp_path / "run").mkdir()
    _fifo(tmp_path / "run", "manifest.json")
    with _guard(10), pytest.raises(CompressError, match=r"manifest .*manifest.json is not a regular file \(a FIFO\)"):
        Run._read(tmp_path / "run")
    with _guard(10), pytest.raises(CompressError, match="teacher .* is not a regular file"):
        load_teacher(tmp_path / "fifo")


# --- printed paths are shell-quoted: pasting a hint never runs a $(...) from a folder's name ----------------------
def _pasted(line: str, cwd: Path) -> list[str]:
    """What a POSIX shell makes of a printed command: its words, after the shell has read it (nothing is run)."""
    proc = subprocess.run(["sh", "-c", f'set -- {line}; for a in "$@"; do printf "%s\\0" "$a"; done'], capture_output=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode().split("\0")[:-1]


def test_printed_paths_are_quoted_for_the_shell(cli, distilled, tmp_path, monkeypatch):
    weird = tmp_path / "$(touch PWNED) a b" / "it's `id` run"
    weird.parent.mkdir()
    run = _run_with_report(distilled, tmp_path)
    run.rename(weird)
    code, out, err = cli("-q", "report", weird)
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("report: "))
    assert shlex.split(line)[1] == str(weird / "report.md")
    assert _pasted(line, tmp_path)[1] == str(weird / "report.md")
    # the resume hint after Ctrl-C repeats the command with every argument quoted
    from compressor import api as api_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api_mod, "distill", interrupted)
    out_dir = tmp_path / "$(touch PWNED) out dir"
    code, _, err = cli("distill", "--steps", 3, "--out", out_dir)
    assert code == 130, err
    hint = err[err.index("Resume with: ") + len("Resume with: "):].strip()
    words = _pasted(hint, tmp_path)
    assert words[:2] == ["compress", "distill"] and words[words.index("--out") + 1] == str(out_dir) and words[-1] == "--resume"
    assert shlex.split(hint) == words
    assert not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()


# --- disk and folders ---------------------------------------------------------------------------------
def test_full_disk_during_export_is_exit_3_and_leaves_no_partial_file(cli, distilled, tmp_path, monkeypatch):
    run = _copy_run(distilled, tmp_path / "run")
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if Path(dst).name == "student.onnx":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    code, _, err = cli("export", run)
    assert code == 3, err
    line = one_error_line(err)
    assert "disk full" in line and "student.onnx" in line and "free some space" in line
    assert not (run / "student.onnx").exists()
    assert not _temps(run), _temps(run)
    m = json.loads((run / "manifest.json").read_text())
    assert m["stages"]["export"]["status"] == "failed" and "disk full" in m["stages"]["export"]["error"]


def test_full_disk_while_saving_a_checkpoint_is_a_runtime_error(tmp_path, monkeypatch):
    """torch.save goes through a Python file object, so ENOSPC surfaces as 'disk full' (not torch's RuntimeError)."""
    import builtins

    from compressor import _io

    real_open = builtins.open

    class FullFile:
        def __init__(self, fh):
            self.fh = fh

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, k):
            return getattr(self.fh, k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def fake_open(path, mode="r", *a, **kw):
        fh = real_open(path, mode, *a, **kw)
        return FullFile(fh) if "w" in mode and str(path).endswith(".tmp") else fh

    monkeypatch.setattr(builtins, "open", fake_open)
    target = tmp_path / "ck.pt"
    with pytest.raises(CompressError, match="disk full") as ei:
        _io.torch_save({"w": torch.zeros(1000)}, target)
    monkeypatch.undo()
    assert ei.value.exit_code == 3
    assert not target.exists() and not _temps(tmp_path)


def test_real_enospc_from_dev_full_maps_to_disk_full(tmp_path):
    """The same mapping with the kernel's own ENOSPC (/dev/full), not a fake one."""
    from compressor._io import write_error

    with pytest.raises(OSError) as ei:
        with open("/dev/full", "wb") as fh:
            torch.save({"w": torch.zeros(100000)}, fh)
    err = write_error(ei.value, tmp_path / "x")
    assert ei.value.errno == errno.ENOSPC and err.exit_code == 3 and "disk full" in str(err)


def test_out_under_a_regular_file_is_exit_2(cli, tiny, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("I am a file")
    code, _, err = cli("--teacher", tiny.torchscript, "--data", tiny.npz, "--steps", 2, "--out", blocker / "run")
    assert code == 2, err
    line = one_error_line(err)
    assert "not_a_dir" in line and "--out" in line
    assert blocker.read_text() == "I am a file"


def test_out_without_write_permission_is_exit_2(cli, tiny, tmp_path, monkeypatch):
    """Tests run as root, where chmod does not stop writes: simulate the kernel's EACCES."""
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **kw):
        if "locked" in self.parts:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, _, err = cli("--teacher", tiny.torchscript, "--data", tiny.npz, "--steps", 2, "--out", tmp_path / "locked" / "run")
    assert code == 2, err
    line = one_error_line(err)
    assert "permission denied" in line and "--out" in line


# --- out of GPU memory --------------------------------------------------------------------------------
OOM_STUDENT = '''
import torch
import torch.nn as nn


class Greedy(nn.Module):
    def __init__(self, n, k):
        super().__init__()
        self.lin = nn.Linear(n, k)

    def forward(self, x):
        if self.training:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.lin(x)


def build(input_shape, num_classes):
    return Greedy(input_shape[0], num_classes)
'''

OOM_TEACHER_ARCH = '''
import torch
import torch.nn as nn


class BigBatchTeacher(nn.Sequential):
    def forward(self, x):
        if x.shape[0] > 2:  # the 2-row probe fits; the pool inference does not
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().forward(x)


def build():
    return BigBatchTeacher(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
'''


def test_out_of_gpu_memory_while_training_advises_a_smaller_batch(cli, tiny, tmp_path):
    f = tmp_path / "oom_student.py"
    f.write_text(OOM_STUDENT)
    code, _, err = cli("-q", "distill", "--teacher", tiny.torchscript, "--data", tiny.npz, "--student", f"{f}:build",
                       "--steps", 5, "--batch-size", 64, "--no-baseline", "--out", tmp_path / "run")
    assert code == 3, err
    line = one_error_line(err)
    assert "out of GPU memory" in line and "--batch-size 32" in line


def test_out_of_gpu_memory_in_the_teacher_advises_a_smaller_batch(cli, tiny, tmp_path):
    f = tmp_path / "oom_arch.py"
    f.write_text(OOM_TEACHER_ARCH)
    code, _, err = cli("-q", "distill", "--teacher", tiny.state_dict, "--teacher-arch", f"{f}:build", "--data", tiny.npz,
                       "--steps", 5, "--no-baseline", "--out", tmp_path / "run")
    assert code == 3, err
    line = one_error_line(err)
    assert "out of GPU memory running the teacher" in line and "--batch-size" in line


# --- NaN loss -----------------------------------------------------------------------------------------
NAN_STUDENT = '''
import torch
import torch.nn as nn


class Unstable(nn.Module):
    """Fine for 10 training steps, then its outputs become NaN (as after an exploding update)."""

    def __init__(self, n, k):
        super().__init__()
        self.lin = nn.Linear(n, k)
        self.calls = 0

    def forward(self, x):
        y = self.lin(x)
        if self.training:
            self.calls += 1
            if self.calls > 10:
                return y * float("nan")
        return y


def build(input_shape, num_classes):
    return Unstable(input_shape[0], num_classes)
'''


def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_says_what_to_change(cli, tiny, tmp_path):
    f = tmp_path / "nan_student.py"
    f.write_text(NAN_STUDENT)
    out = tmp_path / "run"
    code, _, err = cli("-q", "distill", "--teacher", tiny.torchscript, "--data", tiny.npz, "--student", f"{f}:build",
                       "--steps", 20, "--no-baseline", "--out", out)
    assert code == 3, err
    line = one_error_line(err)
    ck = out / "checkpoints" / "student.ckpt"
    assert "loss became nan at step 10" in line and "last good checkpoint (step 10)" in line and str(ck) in line
    assert "--lr" in line
    state = torch.load(ck, weights_only=True)
    assert state["step"] == 10 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "student.pt").exists() and not _temps(out)
    m = json.loads((out / "manifest.json").read_text())
    assert m["stages"]["distill"]["status"] == "failed"
    assert "Traceback" in (out / "compress.log").read_text(), "the full trace goes to the run's log, not the console"


def test_data_so_large_the_teacher_overflows_is_refused_before_training(cli, tiny, tmp_path):
    huge = tmp_path / "huge.npz"
    np.savez(huge, x=np.clip(tiny.x, -3, 3) * np.float32(1e38), y=tiny.y, x_test=tiny.x_test, y_test=tiny.y_test)
    code, _, err = cli("-q", "distill", "--teacher", tiny.torchscript, "--data", huge, "--steps", 5, "--no-baseline",
                       "--out", tmp_path / "run")
    assert code == 2, err
    assert "NaN or Inf" in one_error_line(err) and "scale" in err


# --- an operation ONNX cannot export ----------------------------------------------------------------------
UNEXPORTABLE_STUDENT = '''
import torch
import torch.nn as nn


class Median(nn.Module):
    def __init__(self, n, k):
        super().__init__()
        self.lin = nn.Linear(n, k)

    def forward(self, x):
        return self.lin(x - torch.kthvalue(x, 2, dim=1, keepdim=True).values)  # aten::kthvalue has no ONNX export


def build(input_shape, num_classes):
    return Median(input_shape[0], num_classes)
'''


def test_student_with_an_op_onnx_cannot_export_is_exit_3_naming_the_op(cli, tiny, tmp_path):
    f = tmp_path / "median_student.py"
    f.write_text(UNEXPORTABLE_STUDENT)
    out = tmp_path / "run"
    code, _, err = cli("-q", "distill", "--teacher", tiny.torchscript, "--data", tiny.npz, "--student", f"{f}:build",
                       "--target", "cpu", "--steps", 5, "--no-baseline", "--out", out)
    assert code == 3, err  # the preflight finds it before any training step
    line = one_error_line(err)
    assert line.startswith("error: preflight:") and "kthvalue" in line and "nothing was trained" in line and "torch.topk" in line
    assert not (out / "student.pt").exists()
    code, _, err = cli("-q", "distill", "--teacher", tiny.torchscript, "--data", tiny.npz, "--student", f"{f}:build",
                       "--target", "cpu", "--steps", 5, "--no-baseline", "--out", out, "--skip-preflight")
    assert code == 0, err
    code, _, err = cli("-q", "export", out)
    assert code == 3, err
    line = one_error_line(err)
    assert "cannot be exported to ONNX" in line and "kthvalue" in line and "replace the unsupported operation" in line
    assert not (out / "student.onnx").exists() and not _temps(out)


# --- kill -9 during export -------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_during_export_never_leaves_a_partial_onnx(distilled, tmp_path):
    """Kill `compress export --force` at random moments: student.onnx is absent or a complete, valid model."""
    import onnx

    run = _copy_run(distilled, tmp_path / "run")
    cmd = [sys.executable, "-m", "compressor.cli", "-q", "export", str(run), "--force"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    full = time.perf_counter() - t0
    onnx.checker.check_model(onnx.load(str(run / "student.onnx")), full_check=True)
    rng = random.Random(0)
    outcomes = []
    for i in range(8):
        (run / "student.onnx").unlink(missing_ok=True)  # whatever exists afterwards was written by the killed process
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.1) * full)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        onnx_path = run / "student.onnx"
        if onnx_path.exists():
            onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
            outcomes.append("complete")
        else:
            outcomes.append("absent")
        # temporaries a SIGKILL leaves behind are hidden names, never the final one
        assert all(p.name.startswith(".") for p in _temps(run))
    # after all that, the stage still finishes cleanly
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    onnx.checker.check_model(onnx.load(str(run / "student.onnx")), full_check=True)
    print(f"kill-during-export outcomes: {outcomes}")


# --- other run-time refusals ----------------------------------------------------------------------------
def test_onnx_that_differs_from_pytorch_is_exit_3_and_removed(cli, distilled, tmp_path, monkeypatch):
    from compressor.export import onnx_io

    run = _copy_run(distilled, tmp_path / "run")
    monkeypatch.setattr(onnx_io, "compare", lambda ref, cand: {"max_abs_diff": 0.5, "agreement": 0.9, "rows": len(ref)})
    code, _, err = cli("export", run)
    assert code == 3, err
    line = one_error_line(err)
    assert "ONNX export differs from PyTorch" in line and "--opset" in line
    assert not (run / "student.onnx").exists()


def test_resume_with_different_settings_is_refused(cli, tiny, distilled, tmp_path):
    run = _copy_run(distilled, tmp_path / "run")
    code, _, err = cli("-q", "distill", "--teacher", tiny.torchscript, "--data", tiny.npz, "--student", tiny.student, "--target", "cpu",
                       "--steps", 30, "--no-baseline", "--device", "cpu", "--resume", "--out", run)
    assert code == 2, err
    assert "--resume" in one_error_line(err) and "--force" in err


def test_cuda_asked_for_without_a_gpu(cli, tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = cli("-q", "distill", "--teacher", tiny.torchscript, "--data", tiny.npz, "--steps", 2, "--no-baseline",
                       "--device", "cuda", "--out", tmp_path / "run")
    assert code == 2, err
    assert "no CUDA GPU" in one_error_line(err) and "--device cpu" in err


def test_a_bug_is_exit_1_with_one_line_and_the_trace_in_the_log(cli, tiny, tmp_path, monkeypatch):
    def broken(*a, **kw):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(api, "distill", broken)
    out = tmp_path / "run"
    code, _, err = cli("distill", "--teacher", tiny.torchscript, "--data", tiny.npz, "--out", out)
    assert code == 1, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("internal error: ZeroDivisionError") and "--debug" in lines[0]
    assert "Traceback" in (out / "compress.log").read_text()


# --- docs/errors.md: every row names a test that exists --------------------------------------------------
def test_every_row_of_the_error_table_names_an_existing_test():
    import re

    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "errors.md").read_text()
    rows = [ln for ln in doc.splitlines() if ln.startswith("| ") and ln.count(" | ") >= 3 and not ln.startswith("| bad input")]
    assert len(rows) >= 40, len(rows)
    for row in rows:
        refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]]+)\])?`", row)
        assert refs, f"row without a test: {row}"
        assert re.search(r"\| (0|1|2|3|4|130|137) \|", row), f"row without an exit code: {row}"
        for path, name, param in refs:
            src = (root / path).read_text()
            assert re.search(rf"^def {name}\(", src, re.M), f"{path}::{name} does not exist"
            if param and path.endswith("test_reliability.py") and name == "test_bad_input_is_one_line_and_exit_2":
                assert param in BAD_INPUTS, param
            elif param:
                assert all(p in src for p in param.split("-")), f"{path}::{name}[{param}]"


def test_a_stage_that_fails_early_is_recorded_as_failed_in_the_manifest(tiny, tmp_path):
    """An error before training starts (here: labels beyond the teacher's classes) still leaves an honest manifest."""
    import json

    from compressor.api import distill
    from compressor.config import CompressConfig, DataConfig, DistillConfig

    data = _npz(tmp_path, tiny, y=np.where(tiny.y == 2, 5, tiny.y))
    cfg = CompressConfig(teacher=str(tiny.torchscript), data=DataConfig(source=str(data)), distill=DistillConfig(steps=5))
    with pytest.raises(CompressError, match="labels go up to 5"):
        distill(cfg, tmp_path / "run")
    st = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["distill"]
    assert st["status"] == "failed" and "labels go up to 5" in st["error"]
