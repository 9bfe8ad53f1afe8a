"""The README's first command, end to end: the built-in example on mnist1d with the demo teacher."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compressor.bench.report import load_report


@pytest.mark.slow
def test_builtin_example_end_to_end(tmp_path: Path):
    out = tmp_path / "run"
    env = {**os.environ, "COMPRESSOR_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "compressor.cli", "--target", "jetson", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = load_report(out / "report.json")  # validates against the shipped schema
    by = {m["name"]: m for m in rep["models"]}
    teacher, student, base = by["teacher"], by["student"], by["baseline (labels only)"]
    fp32, int8 = by["student onnx fp32"], by["student onnx int8"]
    assert rep["data"] == {"name": "mnist1d", "train_labeled": 4000, "train_unlabeled": 40000, "heldout": 11000, "heldout_source": "x_test"}
    # Distillation earns its keep: clearly above labels alone with the same student and budget.
    assert student["accuracy"] >= base["accuracy"] + 0.01, (student["accuracy"], base["accuracy"])
    assert student["params"] * 10 <= teacher["params"]
    # Export and INT8 keep the student's behaviour.
    assert abs(fp32["accuracy"] - student["accuracy"]) <= 0.002
    assert rep["checks"]["export"]["max_abs_diff"] <= 1e-3
    assert fp32["accuracy"] - int8["accuracy"] <= 0.01
    # Jetson is not this host: the report must say where latency was measured.
    assert rep["target"]["name"] == "jetson-orin-nano-8gb" and rep["target"]["latency_measured_on"] == "host"
    assert rep["checks"]["quantize"]["recipe"] == "tensorrt"
    assert "report.json" in proc.stdout and (out / "report.md").read_text().count("| student") >= 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done" for s in ("distill", "export", "quantize", "bench", "report"))
