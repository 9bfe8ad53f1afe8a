"""False positives and power of compress gate's re-timing latency check, idle and under load.

    python benchmarks/gate_fpr.py              # writes benchmarks/results/gate_fpr.md and .json (about 12 minutes)

One trained run of the built-in example (its teacher and mnist1d data, target cpu, a short schedule) is benched once and
written as a baseline bundle. The run is then gated against its own bundle K times with nothing changed (identical
models: every latency failure is a false positive), once on an idle machine and once with a CPU-heavy process on the
other core. For power, the current INT8 student is made 12%, 20% and 30% slower (runtime.SlowedRunner: after each
call it spins for that fraction of the call's own time) and gated again, idle and under load. The gate's defaults are used
(7 rounds of 0.2 s, slowdown over 10% and one-sided Wilcoxon signed-rank p < 0.05 on the paired rounds). The same run benched with 1 and with 2
threads also shows what the old rule (each model's latency as a ratio to the teacher inside each report) made of
identical models whose relative speeds shift.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

INT8 = "student onnx int8"


def one_gate(run: Path, bundle: Path, cfg, slow: float = 0.0):
    """Re-time the bundle against the run (INT8 made `slow` slower) and gate; returns the GateResult."""
    from compressor.bench.retime import open_side, plan_pairs, time_pairs
    from compressor.gate import gate, matches
    from compressor.runtime import SlowedRunner

    cur, base = open_side(run, "current"), open_side(bundle, "baseline")
    pairs, why = plan_pairs(base, cur, [(b, c) for b, c in matches(cur.report, base.report, cfg) if c is not None])
    for p in pairs:
        if p.name == INT8 and slow:
            p.cur_runner = SlowedRunner(p.cur_runner, slow)
    time_pairs(pairs, rounds=cfg.rounds, duration_s=cfg.round_duration_s)
    return gate(cur.report, base.report, cfg, timed={p.name: (p.base_samples, p.cur_samples) for p in pairs}, not_timed=why)


def ratio_rule_failures(cur: dict, base: dict, limit: float = 0.10) -> dict:
    """The rule before re-timing: best round over the teacher's best round inside each report; the growth of that
    ratio per model (a failure past `limit` with Mann-Whitney p < 0.05 on the per-round ratios)."""
    from compressor.gate import mann_whitney_greater

    def ratios(rep):
        t = min(rep["models"][0]["latency_ms"]["samples_p50"])
        return {m["name"]: [v / t for v in m["latency_ms"]["samples_p50"]] for m in rep["models"][1:]}
    rb, rc = ratios(base), ratios(cur)
    return {n: {"growth_pct": round(100 * (min(rc[n]) / min(rb[n]) - 1), 1),
                "fails": bool(min(rc[n]) / min(rb[n]) - 1 > limit and mann_whitney_greater(rc[n], rb[n]) < 0.05)} for n in rb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs") / f"gate-fpr-{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument("--gates", type=int, default=20, help="identical-model gates per load mode (K)")
    ap.add_argument("--power-gates", type=int, default=8, help="gates per slowdown and load mode")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "gate_fpr.md")
    a = ap.parse_args()

    from _quick_run import quick_run

    from compressor import api
    from compressor.bench.host import describe_host
    from compressor.bench.retime import open_side, write_bundle
    from compressor.config import BenchConfig, GateConfig

    t0 = time.perf_counter()
    run = quick_run(a.work)
    cfg = GateConfig()
    res = {"host": describe_host(), "date": time.strftime("%Y-%m-%d"), "config": cfg.to_dict(), "modes": {}}
    # the old rule on identical models benched with 2 threads, then 1 (the same run, the same files)
    reps = {}
    for threads in (2, 1):
        reps[threads] = api.bench(run, BenchConfig(threads=threads, repeat=5, min_duration_s=0.3), force=True)
    res["ratio_rule"] = {"1 thread vs 2-thread baseline": ratio_rule_failures(reps[1], reps[2]),
                         "2 threads vs 1-thread baseline": ratio_rule_failures(reps[2], reps[1])}
    bundle = a.work / "baseline"
    write_bundle(open_side(run, "run"), bundle)  # the run as last benched: 1 thread
    for load in ("idle", "under load"):
        hog = None
        if load == "under load":
            hog = subprocess.Popen([sys.executable, "-c", "while True: sum(i * i for i in range(10000))"])
        try:
            effects, failed, checks = [], 0, 0
            for i in range(a.gates):
                g = one_gate(run, bundle, cfg)
                for c in g.checks:
                    if c.check == "latency" and c.status != "skip":
                        checks += 1
                        failed += c.status == "fail"
                        effects.append(float(c.detail.split("%")[0]))
                print(f"{load}: identical gate {i + 1}/{a.gates}: {g.summary()}", flush=True)
            power = {}
            for slow in (0.12, 0.20, 0.30):
                hits, seen = 0, []
                for _ in range(a.power_gates):
                    g = one_gate(run, bundle, cfg, slow)
                    chk = next(c for c in g.checks if c.model == INT8 and c.check == "latency")
                    hits += chk.status == "fail"
                    seen.append(float(chk.detail.split("%")[0]))
                power[f"{round(100 * slow)}%"] = {"caught": hits / a.power_gates, "measured_effect_pct": [round(v, 1) for v in seen]}
                print(f"{load}: INT8 {100 * slow:.0f}% slower caught in {hits}/{a.power_gates}", flush=True)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        res["modes"][load] = {"gates": a.gates, "latency_checks": checks, "latency_false_positives": failed,
                              "max_abs_effect_pct": max(abs(e) for e in effects), "effects_pct": effects, "power": power}
    res["seconds"] = time.perf_counter() - t0
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.with_suffix(".json").write_text(json.dumps(res, indent=1))
    h = res["host"]
    lines = ["# compress gate: false positives and power of the re-timing latency check", "",
             f"`python benchmarks/gate_fpr.py` on {h['cpu']} ({h['cpu_count']} cores; {', '.join(h.get('cpu_features') or []) or 'no AVX2/VNNI flags'}), "
             f"{res['date']}, {res['seconds']:.0f} s. One run of the built-in example (target cpu, 300 steps) gated against its own baseline "
             f"bundle with the defaults ({cfg.rounds} interleaved rounds of {cfg.round_duration_s:g} s per model; a failure needs a slowdown "
             f"over {100 * cfg.max_latency_regression:g}% and a one-sided Wilcoxon signed-rank p < {cfg.alpha:g} on the paired rounds). 'Under load': a CPU-bound Python process on the other core.", "",
             "| machine | gates (identical models) | latency checks | false positives | largest abs. effect | INT8 made 12% / 20% / 30% slower: caught in |",
             "|---|---|---|---|---|---|"]
    for load, r in res["modes"].items():
        caught = " / ".join(f"{100 * v['caught']:.0f}%" for v in r["power"].values())
        lines.append(f"| {load} | {r['gates']} | {r['latency_checks']} | {r['latency_false_positives']} | {r['max_abs_effect_pct']:.1f}% | {caught} of the gates |")
    lines += ["", "Measured INT8 effect when made slower (per gate):", ""]
    for load, r in res["modes"].items():
        lines.append(f"- {load}: " + "; ".join(f"{k}: {', '.join(f'{v:+.1f}%' for v in p['measured_effect_pct'])}" for k, p in r["power"].items()))
    lines += ["", "The rule the gate used before (latency as a ratio to the teacher inside each report) on the same, unchanged model "
              "files benched with 1 and with 2 threads (growth of each model's ratio; a failure past 10%):", "",
              "| current vs baseline | " + " | ".join(next(iter(res["ratio_rule"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(res["ratio_rule"].values())))]
    for k, v in res["ratio_rule"].items():
        lines.append(f"| {k} | " + " | ".join(f"{x['growth_pct']:+.1f}% {'fail' if x['fails'] else 'pass'}" for x in v.values()) + " |")
    lines.append("")
    a.results.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
