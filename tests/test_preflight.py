"""Preflight and the exporter chain end to end: a hand-written student ending in AdaptiveAvgPool2d(2) on a 7x7 map (which
the TorchScript-based exporter refuses) runs the whole pipeline to a report with no flag; a student with an op no
exporter accepts fails before the teacher's pass and the first training step, naming the op and the module; a student
returning a dict trains and ships its logits."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from compressor import api
from compressor.config import CompressConfig, DataConfig, DistillConfig

STUDENTS = '''
import torch
import torch.nn as nn


def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))


class AvgPool7to2(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.f = nn.Sequential(block(1, 8), block(8, 16), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)  # 7x7 -> 2x2: not a factor, which the TorchScript-based exporter refuses
        self.head = nn.Linear(16 * 4, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.f(x)), 1))


class MaxPool7to3(AvgPool7to2):
    def __init__(self, num_classes):
        super().__init__(num_classes)
        self.pool = nn.AdaptiveMaxPool2d(3)  # no exporter has it
        self.head = nn.Linear(16 * 9, num_classes)


class WithAux(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.f = nn.Sequential(block(1, 8), block(8, 16))
        self.aux = nn.Linear(16, 4)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        h = self.f(x).mean((2, 3))
        return {"aux": self.aux(h), "scores": self.fc(h)}


def avg(input_shape, num_classes):
    return AvgPool7to2(num_classes)


def maxpool(input_shape, num_classes):
    return MaxPool7to3(num_classes)


def aux(input_shape, num_classes):
    return WithAux(num_classes)
'''


def _images(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """28x28 grayscale images: a bright 8x8 square in one of three places, on noise."""
    y = rng.integers(0, 3, n)
    x = 0.2 * rng.standard_normal((n, 1, 28, 28)).astype(np.float32)
    for i, c in enumerate(y):
        r, col = [(2, 2), (2, 18), (18, 10)][c]
        x[i, 0, r:r + 8, col:col + 8] += 1.0
    return x, y.astype(np.int64)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import torch
    import torch.nn as nn

    d = tmp_path_factory.mktemp("img28")
    rng = np.random.default_rng(0)
    x, y = _images(900, rng)
    xt, yt = _images(200, rng)
    y_pool = y.copy()
    y_pool[300:] = -1  # a third labeled, the rest an unlabeled pool
    np.savez(d / "data.npz", x=x, y=y_pool, x_test=xt, y_test=yt)
    torch.manual_seed(0)
    t = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(16 * 49, 3))
    opt = torch.optim.Adam(t.parameters(), 3e-3)
    for _ in range(60):
        loss = nn.functional.cross_entropy(t(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.jit.save(torch.jit.script(t.eval()), str(d / "teacher.pt"))
    (d / "students.py").write_text(STUDENTS)
    return d


def _cfg(d, student: str, target: str = "cpu", steps: int = 150) -> CompressConfig:
    from conftest import small_bench

    return CompressConfig(teacher=str(d / "teacher.pt"), data=DataConfig(source=str(d / "data.npz")), target=target,
                          distill=DistillConfig(student=f"{d / 'students.py'}:{student}", steps=steps, evals=3, device="cpu"),
                          bench=small_bench())


def test_adaptive_avg_pool_on_7x7_runs_the_whole_pipeline_with_no_flag(images, tmp_path):
    rep = api.compress(_cfg(images, "avg"), out=tmp_path / "run")
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    pre = m["distill"]["result"]["preflight"]
    assert pre["exporter"] == "dynamo" and "adaptive_avg_pool2d" in pre["rejected"][0]["reason"]
    check = m["export"]["result"]["check"]
    assert check["exporter"] == "dynamo" and check["opset"] == 18 and check["max_abs_diff"] <= check["atol"]
    assert "adaptive_avg_pool2d" in check["exporters_rejected"][0]["reason"]
    assert any("torch.export-based exporter" in n and "adaptive_avg_pool2d" in n for n in rep["notes"]), rep["notes"]
    by = {r["name"]: r for r in rep["models"]}
    assert by["student"]["accuracy"] > 0.8 and abs(by["student onnx fp32"]["accuracy"] - by["student"]["accuracy"]) <= 0.01
    assert by["student onnx int8"]["accuracy"] > 0.75


def test_a_student_no_exporter_accepts_fails_in_preflight_before_any_training(images, tmp_path, cli, monkeypatch):
    from compressor.distill import teacher_pass, trainer

    def never(*a, **k):
        raise AssertionError("reached a step the preflight must come before")
    monkeypatch.setattr(trainer, "train_student", never)
    monkeypatch.setattr(teacher_pass, "teacher_pool_logits", never)
    from compressor.export import preflight as pf

    spent, real = [], pf.preflight

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            spent.append(time.perf_counter() - t)
    monkeypatch.setattr(pf, "preflight", timed)
    t0 = time.perf_counter()
    code, _, err = cli("distill", "--teacher", images / "teacher.pt", "--data", images / "data.npz",
                       "--student", f"{images / 'students.py'}:maxpool", "--target", "jetson", "--out", tmp_path / "run")
    seconds = time.perf_counter() - t0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 3 and len(lines) == 1, err
    assert "preflight" in err and "adaptive_max_pool2d" in err and "'pool' (AdaptiveMaxPool2d)" in err and "nothing was trained" in err
    assert "AdaptiveMaxPool2d(1)" in err  # what to use instead
    # here: the preflight about 6 s (both exporters tried, the second one's first call included), the command 11.5 s
    # with importing torch and loading the data; the point is that it comes before the teacher's pass and any step
    assert spent and spent[0] < 20 and seconds < 40, (spent, seconds)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "student.pt").exists()


def test_skip_preflight_starts_training(images, tmp_path, monkeypatch):
    from compressor.distill import teacher_pass

    calls = []
    real = teacher_pass.teacher_pool_logits

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(teacher_pass, "teacher_pool_logits", spy)
    cfg = _cfg(images, "maxpool", target="jetson", steps=20)
    cfg.preflight = False
    api.distill(cfg, tmp_path / "run")
    assert calls and (tmp_path / "run" / "student.pt").exists()  # trained; the export stage will refuse it later


def test_a_student_returning_a_dict_ships_the_entry_named_by_output(images, tmp_path):
    cfg = _cfg(images, "aux", steps=120)
    cfg.distill.output = "scores"
    rep = api.compress(cfg, out=tmp_path / "run")
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert m["distill"]["result"]["student_record"]["output"] == "scores"
    by = {r["name"]: r for r in rep["models"]}
    assert by["student"]["accuracy"] > 0.8 and abs(by["student onnx fp32"]["accuracy"] - by["student"]["accuracy"]) <= 0.01
    import onnx

    g = onnx.load(str(tmp_path / "run" / "student.onnx")).graph
    assert len(g.output) == 1 and g.output[0].type.tensor_type.shape.dim[1].dim_value == 3  # the scores, not the 4-wide aux
