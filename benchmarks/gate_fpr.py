"""False-positive rate of compress gate's latency check on identical runs.

    python benchmarks/gate_fpr.py              # writes benchmarks/results/gate_fpr.md and .json (about 6 minutes)

One trained run (the built-in example's teacher and data, target cpu, a short schedule) is benched K times in a row
with nothing changed, once with a single latency measurement per model (`compress bench`) and once with
`compress bench --repeat R`. Every ordered pair of the K reports is gated with the default thresholds (latency ratios to
the teacher may grow 10%; with rounds, the best rounds' ratio must grow 10% and a one-sided Mann-Whitney U test
at alpha 0.05 on the per-round ratios must agree). Any latency
failure between identical runs is a false positive; the accuracy and size checks cannot differ between them and are
reported as a sanity check.
"""
from __future__ import annotations

import argparse
import copy
import itertools
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
    ap.add_argument("--work", type=Path, default=Path("runs") / f"gate-fpr-{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument("--reports", type=int, default=10, help="identical benches per mode (K)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds per bench in the repeated mode (R)")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "gate_fpr.md")
    a = ap.parse_args()

    from _quick_run import quick_run

    from compressor import api
    from compressor.bench.host import describe_host
    from compressor.config import BenchConfig, GateConfig
    from compressor.gate import gate

    t0 = time.perf_counter()
    run = quick_run(a.work)
    cfg = GateConfig()
    modes = {"single measurement": 1, f"--repeat {a.repeat}": a.repeat}
    res = {"host": describe_host(), "date": time.strftime("%Y-%m-%d"), "reports": a.reports, "modes": {}}
    for mode, rounds in modes.items():
        reps = []
        for i in range(a.reports):
            reps.append(api.bench(run, BenchConfig(min_runs=200, min_duration_s=0.3, repeat=rounds), force=True))
            (a.work / f"{rounds}-{i}.json").write_text(json.dumps(reps[-1]))  # kept, to re-gate with other settings
            print(f"{mode}: bench {i + 1}/{a.reports}", flush=True)
        pairs = list(itertools.permutations(range(len(reps)), 2))
        failed_gates, lat_checks, lat_failed, other_failed, effects = 0, 0, 0, 0, []
        for i, j in pairs:
            g = gate(reps[j], reps[i], cfg)
            failed_gates += not g.passed
            for c in g.checks:
                if c.check == "latency" and c.status != "skip":
                    lat_checks += 1
                    lat_failed += c.status == "fail"
                    effects.append(float(c.detail.split("%")[0]))
                elif c.status == "fail":
                    other_failed += 1
        # power: the same pairs with one model made slower in the current report (every round, or the one p50)
        power = {}
        for f in (1.12, 1.2, 1.5):
            hits = 0
            for i, j in pairs:
                cur = copy.deepcopy(reps[j])
                m = next(m for m in cur["models"] if m["name"] == "student onnx int8")
                m["latency_ms"]["p50"] *= f
                if "samples_p50" in m["latency_ms"]:
                    m["latency_ms"]["samples_p50"] = [v * f for v in m["latency_ms"]["samples_p50"]]
                hits += any(c.model == m["name"] and c.check == "latency" and c.status == "fail" for c in gate(cur, reps[i], cfg).checks)
            power[f"{round(100 * (f - 1))}%"] = hits / len(pairs)
        p50s = {m["name"]: [r["models"][k]["latency_ms"]["p50"] for r in reps] for k, m in enumerate(reps[0]["models"])}
        res["modes"][mode] = {"rounds": rounds, "pairs": len(pairs), "gates_failed": failed_gates, "latency_checks": lat_checks,
                              "latency_failed": lat_failed, "other_failed": other_failed,
                              "max_abs_effect_pct": max(abs(e) for e in effects) if effects else 0.0, "power": power,
                              "p50_spread_pct": {n: 100 * (max(v) / min(v) - 1) for n, v in p50s.items()}}
    res["seconds"] = time.perf_counter() - t0
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.with_suffix(".json").write_text(json.dumps(res, indent=1))
    h = res["host"]
    lines = ["# compress gate: false positives of the latency check on identical runs", "",
             f"`python benchmarks/gate_fpr.py` on {h['cpu']} ({h['cpu_count']} cores), {res['date']}, {res['seconds']:.0f} s: one run "
             f"(built-in example data and teacher, target cpu, 300 steps) benched {a.reports} times per mode with nothing changed "
             "(200 runs and 0.3 s per measurement, 1 thread); every ordered pair of reports gated with the defaults "
             f"(latency ratio to the teacher may grow {100 * cfg.max_latency_regression:g}%; with rounds, the best rounds' ratio, "
             f"and a one-sided Mann-Whitney U test on the per-round ratios at p < {cfg.alpha:g}).", "",
             "| mode | gated pairs | gates failed | latency checks | latency false positives | rate | largest |effect| | other checks failed "
             "| INT8 made 12% / 20% / 50% slower: caught in |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, r in res["modes"].items():
        rate = r["latency_failed"] / r["latency_checks"] if r["latency_checks"] else 0.0
        caught = " / ".join(f"{100 * v:.0f}%" for v in r["power"].values())
        lines.append(f"| {mode} | {r['pairs']} | {r['gates_failed']} | {r['latency_checks']} | {r['latency_failed']} | {100 * rate:.1f}% | "
                     f"{r['max_abs_effect_pct']:.1f}% | {r['other_failed']} | {caught} of the pairs |")
    lines += ["", "Spread of each model's p50 across the identical benches (max/min − 1):", ""]
    for mode, r in res["modes"].items():
        lines.append(f"- {mode}: " + ", ".join(f"{n} {v:.1f}%" for n, v in r["p50_spread_pct"].items()))
    lines.append("")
    a.results.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
