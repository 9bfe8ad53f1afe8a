"""Ctrl-C / SIGTERM / SIGKILL during distillation: the run stops cleanly, and --resume finishes it with
the same weights as an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _cmd(out: Path, extra=()):
    # the built-in data with a small pool keeps this quick; enough steps that the run can be interrupted
    return [sys.executable, "-m", "compressor.cli", "distill", "--out", str(out), "--steps", "1500", "--no-baseline", *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "COMPRESSOR_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    ref = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_cmd(ref), check=True, env=env, capture_output=True, timeout=600)
    return torch.load(ref / "student.pt", weights_only=True)


def _wait_for(path: Path, proc, timeout=300):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupt_then_resume_matches_uninterrupted(tmp_path, sig, env, reference):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "checkpoints" / "student.ckpt", proc)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, err
        assert "--resume" in err and "Traceback" not in err
    assert not (out / "student.pt").exists()
    if sig != signal.SIGKILL:  # a killed process cannot clean up; the next run of a stage does
        assert not [p for p in out.rglob("*.tmp")], "a temporary file was left behind"

    subprocess.run(_cmd(out, ["--resume"]), check=True, env=env, capture_output=True, timeout=600)
    assert not [p for p in out.rglob("*.tmp")], "a temporary file was left behind after the resumed run"
    a = reference
    b = torch.load(out / "student.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)
