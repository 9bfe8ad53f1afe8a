"""Shared fixtures for the fast suite: a tiny labeled+unlabeled .npz, a small teacher trained on it and
saved in every supported format, tiny architecture/student factory files, and small stage configs."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

# One thread everywhere: the suite runs on small shared CI machines where OpenMP threads that spin while
# waiting for a busy core make tiny models hundreds of times slower. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

LENGTH = 32  # signal length
CLASSES = 3
N_TRAIN = 480
N_TEST = 150
N_UNLABELED = 160  # of the training rows, marked y = -1

# A teacher architecture file: the state-dict case needs the module rebuilt from code.
TEACHER_ARCH_SRC = f'''
import torch.nn as nn


def build():
    return nn.Sequential(nn.Linear({LENGTH}, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, {CLASSES}))
'''

# A student factory file (explicit student, small and quick to train).
STUDENT_SRC = '''
import math
import torch.nn as nn


def build(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 16), nn.ReLU(), nn.Linear(16, num_classes))


def boom():
    raise RuntimeError("factory exploded")


def not_a_module():
    return 42
'''


def make_signals(n: int, rng: np.random.Generator, length: int = LENGTH, classes: int = CLASSES):
    """Noisy 1-D signals whose class is the frequency of a sine wave: easy, but not trivial."""
    y = rng.integers(0, classes, n).astype(np.int64)
    t = np.linspace(0, 1, length, dtype=np.float32)
    phase = rng.uniform(0, 2 * np.pi, (n, 1)).astype(np.float32)
    x = np.sin(2 * np.pi * (y[:, None] + 1) * t[None] + phase) + 0.4 * rng.standard_normal((n, length)).astype(np.float32)
    return x.astype(np.float32), y


@dataclass
class Tiny:
    """Paths to the tiny data and every form of the same teacher."""

    dir: Path
    npz: Path  # x, y (some -1), x_test, y_test
    npz_split: Path  # x, y (some -1) only: held-out rows come from a split
    arch: str  # "file.py:build" for the state dict
    arch_file: Path
    torchscript: Path
    state_dict: Path
    pickled: Path
    exported: Path  # torch.export .pt2
    onnx: Path
    student: str  # "file.py:build"
    student_file: Path
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def module(self):
        """A fresh (eval-mode) copy of the trained teacher as a plain torch module."""
        import torch

        m = torch.jit.load(str(self.torchscript))
        return m.eval()


def _train_teacher(x, y, steps: int = 150):
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(LENGTH, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, CLASSES))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    lab = y >= 0
    xt, yt = torch.from_numpy(x[lab]), torch.from_numpy(y[lab])
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (64,), generator=g)
        loss = nn.functional.cross_entropy(m(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    import torch

    torch.set_num_threads(1)

    d = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    x, y = make_signals(N_TRAIN, rng)
    x_test, y_test = make_signals(N_TEST, rng)
    y = y.copy()
    y[-N_UNLABELED:] = -1
    npz = d / "data.npz"
    np.savez(npz, x=x, y=y, x_test=x_test, y_test=y_test)
    npz_split = d / "data_split.npz"
    np.savez(npz_split, x=x, y=y)

    m = _train_teacher(x, y)
    with torch.no_grad():
        acc = float((m(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    assert acc > 0.8, f"the fixture teacher should be far better than chance, got {acc}"

    arch_file = d / "teacher_arch.py"
    arch_file.write_text(TEACHER_ARCH_SRC)
    student_file = d / "student.py"
    student_file.write_text(STUDENT_SRC)

    ts = d / "teacher.ts.pt"
    torch.jit.save(torch.jit.script(m), str(ts))
    sd = d / "teacher_state.pt"
    torch.save(m.state_dict(), sd)
    pk = d / "teacher_pickled.pt"
    torch.save(m, pk)
    ex = d / "teacher.pt2"
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    ep = torch.export.export(m, (torch.from_numpy(x[:4]),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(ex))
    onnx_path = d / "teacher.onnx"
    torch.onnx.export(m, (torch.from_numpy(x[:2]),), str(onnx_path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return Tiny(dir=d, npz=npz, npz_split=npz_split, arch=f"{arch_file}:build", arch_file=arch_file, torchscript=ts,
                state_dict=sd, pickled=pk, exported=ex, onnx=onnx_path, student=f"{student_file}:build",
                student_file=student_file, x=x, y=y, x_test=x_test, y_test=y_test)


@pytest.fixture
def tiny_bench():
    """Bench settings small enough for a unit test."""
    return small_bench()


def small_bench(**changes):
    """Bench settings small enough for a unit test (for module-scoped fixtures, which cannot use tiny_bench)."""
    from compressor.config import BenchConfig

    return BenchConfig(threads=1, min_runs=5, min_duration_s=0.01, warmup_ms=1, warmup_runs=1, eval_batch_size=512).replace(**changes)


def make_finished_run(tiny: "Tiny", out: Path, target: str, steps: int = 60) -> Path:
    """A whole run (distill, export, quantize, bench, report) on the tiny data, quick enough for a module fixture."""
    from compressor import api
    from compressor.config import CompressConfig, DataConfig, DistillConfig

    cfg = CompressConfig(teacher=str(tiny.torchscript), data=DataConfig(source=str(tiny.npz)), target=target,
                         distill=DistillConfig(steps=steps, evals=2, device="cpu"), bench=small_bench())
    api.compress(cfg, out=out)
    return out


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep generated caches out of the user's home directory."""
    old = os.environ.get("COMPRESSOR_CACHE")
    os.environ["COMPRESSOR_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("COMPRESSOR_CACHE", None)
    else:
        os.environ["COMPRESSOR_CACHE"] = old


def run_cli(*args, timeout: float = 300, env: dict | None = None, cwd: Path | None = None):
    """Run `compress ARGS...` in a fresh interpreter; returns the CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "compressor.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


# --- fuzzing: how many inputs the loaders were fed, reported at the end of the run -------------------
FUZZ_COUNTS: dict[str, int] = {}
FUZZ_SECONDS: dict[str, float] = {}


def fuzz_count(kind: str, n: int = 1) -> None:
    FUZZ_COUNTS[kind] = FUZZ_COUNTS.get(kind, 0) + n


def pytest_terminal_summary(terminalreporter):
    if FUZZ_COUNTS:
        total = sum(FUZZ_COUNTS.values())
        parts = ", ".join(f"{k} {v}" for k, v in sorted(FUZZ_COUNTS.items()))
        secs = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(FUZZ_SECONDS.items()))
        terminalreporter.write_line(f"fuzz: {total} inputs tried ({parts}){'; ' + secs if secs else ''}")
        out = os.environ.get("COMPRESSOR_FUZZ_RECORD")
        if out:
            import json

            Path(out).write_text(json.dumps({"total": total, "counts": FUZZ_COUNTS, "seconds": FUZZ_SECONDS}, indent=2) + "\n")


@pytest.fixture
def cli(capsys):
    """Call compressor.cli.main(argv) in this process; returns (exit code, stdout, stderr)."""
    import logging
    import signal

    from compressor.cli import main

    old_term = signal.getsignal(signal.SIGTERM)
    log = logging.getLogger("compressor")
    old_handlers = list(log.handlers)

    def call(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    yield call
    signal.signal(signal.SIGTERM, old_term)
    for h in list(log.handlers):
        if h not in old_handlers:  # the console handler holds capsys' stream; file handlers hold a run's log
            log.removeHandler(h)
            h.close()
