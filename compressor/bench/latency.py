"""One latency methodology for every runner: warm up by time and count, then measure until both a
minimum duration and a minimum number of runs are reached; report percentiles and variation."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

NOISY_CV = 0.15  # coefficient of variation above which a measurement is flagged as noisy
NOISY_ROUNDS = 0.05  # spread of the rounds' p50s (max/min - 1) above which a repeated measurement is flagged as noisy


def measure(fn: Callable[[], object], *, warmup_ms: float = 200.0, warmup_runs: int = 10,
            min_runs: int = 200, min_duration_s: float = 1.0, max_duration_s: float = 30.0) -> dict:
    """Time fn() with a host timer; returns p50/p90/p99/mean/std/min in milliseconds plus runs and cv."""
    start = time.perf_counter()
    n = 0
    while n < warmup_runs or (time.perf_counter() - start) * 1000 < warmup_ms:
        fn()
        n += 1
    times = []
    begin = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - begin
        if (len(times) >= min_runs and elapsed >= min_duration_s) or elapsed >= max_duration_s:
            break
    ms = np.asarray(times) * 1000.0
    mean = float(ms.mean())
    cv = float(ms.std() / mean) if mean > 0 else 0.0
    return {
        "p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)), "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "mean": mean, "std": float(ms.std()), "min": float(ms.min()), "runs": len(times), "cv": cv, "noisy": cv > NOISY_CV,
    }
