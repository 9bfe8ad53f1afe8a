"""Does `compress bench`, run twice in a row on the same models, give p50s within 5% of each other — or say the run
was noisy? One trained run (built-in example data and teacher, target cpu, 300 steps) is benched K times in a row
with the default BenchConfig (3 interleaved rounds of >= 1 s and >= 200 runs per model, 200 ms warm-up, 1 thread).

    python benchmarks/bench_repeatability.py      # writes benchmarks/results/bench_repeatability.md (about 4 minutes)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs") / f"bench-repeatability-{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument("--benches", type=int, default=8)
    ap.add_argument("--results", type=Path, default=HERE / "results" / "bench_repeatability.md")
    a = ap.parse_args()

    from _quick_run import quick_run

    from compressor import api
    from compressor.bench.host import describe_host
    from compressor.config import BenchConfig

    t0 = time.perf_counter()
    run = quick_run(a.work)
    reps = []
    for i in range(a.benches):
        reps.append(api.bench(run, BenchConfig(), force=True))
        print(f"bench {i + 1}/{a.benches}", flush=True)
    names = [m["name"] for m in reps[0]["models"]]
    rows = {n: {"pairs": 0, "within_5pct": 0, "flagged": 0, "neither": 0, "max_diff_pct": 0.0} for n in names}
    for r1, r2 in zip(reps, reps[1:]):
        for m1, m2 in zip(r1["models"], r2["models"]):
            d = abs(m2["latency_ms"]["p50"] / m1["latency_ms"]["p50"] - 1)
            row = rows[m1["name"]]
            row["pairs"] += 1
            row["max_diff_pct"] = max(row["max_diff_pct"], 100 * d)
            flagged = bool(m1["latency_ms"].get("noisy") or m2["latency_ms"].get("noisy"))
            row["within_5pct"] += d <= 0.05
            row["flagged"] += d > 0.05 and flagged
            row["neither"] += d > 0.05 and not flagged
    res = {"host": describe_host(), "date": time.strftime("%Y-%m-%d"), "benches": a.benches, "models": rows,
           "seconds": time.perf_counter() - t0, "config": BenchConfig().to_dict()}
    a.results.with_suffix(".json").write_text(json.dumps(res, indent=1))
    h = res["host"]
    lines = ["# Repeatability of `compress bench` (default settings)", "",
             f"`python benchmarks/bench_repeatability.py` on {h['cpu']} ({h['cpu_count']} cores), {res['date']}, {res['seconds']:.0f} s: "
             f"one run benched {a.benches} times in a row with the default BenchConfig (3 interleaved rounds per model, each ≥ 1 s and "
             "≥ 200 runs after 200 ms of warm-up, 1 thread; p50 = the median round; noisy = the rounds' p50s spread over 5% or a "
             "coefficient of variation over 15%). Consecutive benches compared:", "",
             "| model | pairs | p50 within 5% | differs > 5% but flagged noisy | differs > 5% unflagged | largest difference |",
             "|---|---|---|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {n} | {r['pairs']} | {r['within_5pct']} | {r['flagged']} | {r['neither']} | {r['max_diff_pct']:.1f}% |")
    total = sum(r["neither"] for r in rows.values())
    lines += ["", f"Unflagged differences over 5%: {total} of {sum(r['pairs'] for r in rows.values())} comparisons.", ""]
    a.results.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
