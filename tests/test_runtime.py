"""Runners share one interface and agree with each other; the latency methodology honours its minimums;
the KD loss behaves as documented."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from compressor.bench.latency import measure
from compressor.errors import CompressError
from compressor.runtime import OnnxRuntimeRunner, TorchRunner, infer_batched


def test_torch_and_onnx_runners_agree(tiny):
    x = tiny.x_test[:37]
    with TorchRunner(tiny.module(), threads=1) as tr:
        a = infer_batched(tr, x, batch_size=8)
        assert tr.describe() == {"format": "pytorch", "runtime": "torch", "device": "cpu", "threads": 1}
    with OnnxRuntimeRunner(tiny.onnx, threads=1) as orr:
        b = infer_batched(orr, x, batch_size=8)
        d = orr.describe()
    assert d["format"] == "onnx" and d["runtime"] == "onnxruntime" and d["provider"] == "CPUExecutionProvider"
    assert a.shape == b.shape == (37, 3) and a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_torch_runner_restores_the_thread_count(tiny):
    before = torch.get_num_threads()
    with TorchRunner(tiny.module(), threads=before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before


def test_onnx_runner_on_a_bad_file_is_a_compress_error(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"nope")
    with pytest.raises(CompressError, match="ONNX Runtime cannot load"):
        OnnxRuntimeRunner(p).activate()


def test_measure_honours_minimum_runs_and_duration():
    calls = []
    r = measure(lambda: calls.append(1), warmup_ms=0, warmup_runs=3, min_runs=50, min_duration_s=0.0)
    assert r["runs"] >= 50 and len(calls) == r["runs"] + 3
    assert r["min"] <= r["p50"] <= r["p90"] <= r["p99"]
    t0 = time.perf_counter()
    r = measure(lambda: None, warmup_ms=0, warmup_runs=0, min_runs=1, min_duration_s=0.05)
    assert time.perf_counter() - t0 >= 0.05 and r["runs"] > 1
    r = measure(lambda: time.sleep(0.002), warmup_ms=0, warmup_runs=0, min_runs=5, min_duration_s=0.0)
    assert r["p50"] >= 2.0 and r["runs"] == 5


def test_execution_providers_are_picked_from_what_onnxruntime_has():
    from compressor.errors import CompressError
    from compressor.runtime import pick_providers

    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert pick_providers("auto", gpu) == gpu
    assert pick_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert pick_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert pick_providers("cuda", gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert pick_providers("cpu", gpu) == ["CPUExecutionProvider"]
    with pytest.raises(CompressError, match="no CUDAExecutionProvider"):
        pick_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(CompressError, match="unknown execution provider"):
        pick_providers("gpu", gpu)
