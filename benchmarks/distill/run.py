"""The distillation benchmark: every recipe against labels-only training of the same student, on
mnist1d at 1,000 / 4,000 / 16,000 labels (the rest of the 44,000-row pool unlabeled), scikit-learn's digits
with 10% of the labels, and a small transformer-encoder teacher on a synthetic token-sequence task; 3 seeds.

    python benchmarks/distill/run.py                       # everything (about 40 min on 2 cores)
    python benchmarks/distill/run.py --cases mnist1d-4k --methods kd,dkd --seeds 0

Every number comes from compressor.api.distill (the same code path as `compress distill`) and the student's
accuracy on the case's held-out rows, which no training step or selection ever sees. Results are written to
benchmarks/results/distill.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SIGNAL_STUDENT = f"{ROOT / 'benchmarks' / 'models.py'}:student"  # SmallSignalCNN, 4,570 parameters
SIGNAL_ARCH = f"{ROOT / 'benchmarks' / 'models.py'}:SignalCNN"

# (loss and knobs) per column; "teacher": which form of the teacher the method needs
METHODS = {
    "kd": dict(loss="kd"),  # also trains the labels-only baseline with the same budget
    "kd-ls": dict(loss="kd", logit_standardize=True),
    "dkd": dict(loss="dkd"),
    "dist": dict(loss="dist"),
    "hint": dict(loss="kd", hint="auto"),
    "fm": dict(loss="kd", augment="auto", mixup=0.2),
    "bb-label": dict(teacher_output="label", query_budget=10000),
}
CASES = {
    "mnist1d-1k": dict(kind="mnist1d", labels=1000, steps=4000),
    "mnist1d-4k": dict(kind="mnist1d", labels=4000, steps=4000),
    "mnist1d-16k": dict(kind="mnist1d", labels=16000, steps=4000),
    # the same 4k case with the tool's own default student (3,274 parameters, 7.4% of the teacher)
    "mnist1d-4k-builtin": dict(kind="mnist1d", labels=4000, steps=4000, student="builtin"),
    "digits-10%": dict(kind="digits", steps=1500),
    "seq": dict(kind="seq", steps=5000),  # transformer students from scratch need ~1,000 steps to leave the 21% plateau
}


# ------------------------------------------------------------------------------------------------------
def prepare(case: str, work: Path) -> dict:
    """Data and teacher files for a case (made once, in the work folder): teacher forms, data, student spec."""
    import torch

    from compressor.export.onnx_io import export_onnx

    spec = CASES[case]
    work.mkdir(parents=True, exist_ok=True)
    if spec["kind"] == "mnist1d":
        from compressor.run import DEMO_TEACHER

        ts = torch.jit.load(str(DEMO_TEACHER))
        sd = work / "mnist1d_teacher_state.pt"
        onnx = work / "mnist1d_teacher.onnx"
        if not sd.exists():
            torch.save(ts.state_dict(), sd)
            export_onnx(ts, np.zeros((2, 40), np.float32), onnx, 17)
        return dict(teacher=str(DEMO_TEACHER), eager=str(sd), arch=SIGNAL_ARCH, onnx=str(onnx), data="mnist1d",
                    mnist1d_labels=spec["labels"], student=None if spec.get("student") == "builtin" else SIGNAL_STUDENT,
                    hint=None if spec.get("student") == "builtin" else "features.5=features.11")
    if spec["kind"] == "digits":
        return _prepare_digits(work)
    return _prepare_seq(work)


def _prepare_digits(work: Path) -> dict:
    """scikit-learn's 8×8 digits: 80% pool (10% of it labeled), 20% held out; a CNN teacher trained on the pool's labels."""
    import torch

    from compressor.export.onnx_io import export_onnx

    sys.path.insert(0, str(HERE))
    from digits_models import build_teacher, train

    npz, sd, onnx = work / "digits.npz", work / "digits_teacher.pt", work / "digits_teacher.onnx"
    if not npz.exists():
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
        y = d.target.astype(np.int64)
        order = np.random.default_rng(0).permutation(len(y))
        test, pool = order[: len(y) // 5], order[len(y) // 5:]
        teacher = train(build_teacher(), x[pool], y[pool])
        yp = y[pool].copy()
        yp[np.random.default_rng(1).permutation(len(pool))[int(0.1 * len(pool)):]] = -1  # keep 10% of the labels
        np.savez(npz, x=x[pool], y=yp, x_test=x[test], y_test=y[test])
        torch.save(teacher.state_dict(), sd)
        export_onnx(teacher, x[:2], onnx, 17)
    arch = f"{HERE / 'digits_models.py'}:build_teacher"
    return dict(teacher=str(sd), arch=arch, eager=str(sd), onnx=str(onnx), data=str(npz), student=None, hint="5=features.5")


def _prepare_seq(work: Path) -> dict:
    sys.path.insert(0, str(HERE))
    import seq_task

    paths = seq_task.prepare(work)
    # the built-in student (a 2-layer transformer within a tenth of the teacher's parameters)
    return dict(teacher=str(paths["teacher"]), arch=str(paths["arch"]), eager=str(paths["teacher"]), onnx=str(paths.get("onnx", "")),
                data=str(paths["data"]), student=None, hint=None)


# ------------------------------------------------------------------------------------------------------
def run_one(case: str, method: str, seed: int, prep: dict, work: Path) -> dict:
    """Distil one student; returns held-out accuracies (student and, for kd, the labels-only baseline) and timings."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from compressor import api
    from compressor.config import CompressConfig, DataConfig, DistillConfig

    knobs = dict(METHODS[method])
    teacher, arch = prep["teacher"], prep.get("arch") if prep["teacher"] == prep.get("eager") else None
    if knobs.get("hint"):
        if not prep.get("hint"):
            return {"case": case, "method": method, "seed": seed, "skipped": "no hint layer pair for this case"}
        knobs["hint"], teacher, arch = prep["hint"], prep["eager"], prep["arch"]
    if knobs.get("augment") and CASES[case]["kind"] == "seq":
        return {"case": case, "method": method, "seed": seed, "skipped": "augmentation and mixup do not apply to token ids"}
    if knobs.get("augment") and CASES[case]["kind"] == "digits":
        knobs["augment"] = "image-noflip"  # mirrored digits are other digits
    if method == "bb-label":
        if not prep.get("onnx"):
            return {"case": case, "method": method, "seed": seed, "skipped": "no ONNX teacher for this case"}
        teacher, arch = prep["onnx"], None
    data = DataConfig(source=prep["data"], seed=seed)
    if prep["data"] == "mnist1d":
        data = data.replace(mnist1d_labels=prep["mnist1d_labels"])
    cfg = CompressConfig(teacher=teacher, teacher_arch=arch, data=data,
                         distill=DistillConfig(student=prep["student"], seed=seed, steps=CASES[case]["steps"], device="cpu",
                                               baseline=method == "kd", **knobs))
    out = work / "runs" / f"{case}-{method}-{seed}"
    t0 = time.perf_counter()
    run = api.distill(cfg, out, force=True)
    wall = time.perf_counter() - t0
    res = run.stage("distill")["result"]
    ds = run.data
    row = {"case": case, "method": method, "seed": seed, "wall_s": round(wall, 1), "params": res["params"],
           "teacher_params": res["teacher_params"], "teacher_pass_s": res.get("teacher_pass_seconds", 0.0)}
    for name in ("student", "baseline"):
        if name in res:
            m = run.load_trained(name)
            with torch.inference_mode():
                pred = np.concatenate([m(torch.from_numpy(ds.x_test[i:i + 4096])).argmax(1).numpy() for i in range(0, len(ds.x_test), 4096)])
            row[f"{name}_acc"] = float((pred == ds.y_test).mean())
            row[f"{name}_train_s"] = res[name]["seconds"]
            row[f"{name}_steps_per_s"] = round(res[name]["steps"] / max(res[name]["seconds"], 1e-9), 1)
    if "teacher_queries" in res:  # black-box flow: rows and calls the teacher answered
        row["teacher_rows"], row["teacher_calls"] = res["teacher_queries"]["rows"], res["teacher_queries"]["calls"]
    if "teacher_acc" not in row:
        t = run.teacher
        row["teacher_acc"] = float((t.logits(ds.x_test).argmax(1) == ds.y_test).mean())
    return row


def _fmt(vals: list[float]) -> str:
    if not vals:
        return "–"
    m = 100 * statistics.mean(vals)
    return f"{m:.2f} ± {100 * statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{m:.2f}"


def render(rows: list[dict]) -> str:
    cases = [c for c in CASES if any(r["case"] == c for r in rows)]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lines = ["| case | params student / teacher | teacher | labels-only | " + " | ".join(methods) + " |", "|" + "---|" * (4 + len(methods))]
    for c in cases:
        rs = [r for r in rows if r["case"] == c and "skipped" not in r]
        if not rs:
            continue
        teacher = _fmt(sorted({r["teacher_acc"] for r in rs})[:1])
        base = _fmt([r["baseline_acc"] for r in rs if "baseline_acc" in r])
        cells = [_fmt([r["student_acc"] for r in rs if r["method"] == m]) for m in methods]
        ratio = f"{rs[0]['params']:,} / {rs[0]['teacher_params']:,}" if rs[0].get("teacher_params") else f"{rs[0]['params']:,} / ?"
        lines.append(f"| {c} | {ratio} | {teacher} | {base} | " + " | ".join(cells) + " |")
    skipped = sorted({f"{r['case']} {r['method']}: {r['skipped']}" for r in rows if "skipped" in r})
    if skipped:
        lines += ["", "Not run: " + "; ".join(skipped) + "."]
    lines += ["", "Training speed (steps/s, mean over seeds) and wall time per run (s):", "",
              "| case | labels-only | " + " | ".join(methods) + " |", "|" + "---|" * (2 + len(methods))]
    for c in cases:
        rs = [r for r in rows if r["case"] == c and "skipped" not in r]

        def sp(m, key="student"):
            v = [r[f"{key}_steps_per_s"] for r in rs if r["method"] == m and f"{key}_steps_per_s" in r]
            w = [r["wall_s"] for r in rs if r["method"] == m]
            return f"{statistics.mean(v):.0f} /s, {statistics.mean(w):.0f} s" if v else "–"

        lines.append(f"| {c} | {sp('kd', 'baseline')} | " + " | ".join(sp(m) for m in methods) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "distill")
    ap.add_argument("--out", default="distill", help="results name under benchmarks/results/")
    ap.add_argument("--merge", help="comma-separated result names to combine into --out without running anything")
    args = ap.parse_args()
    if args.merge:
        from compressor._io import write_json, write_text

        parts = [json.loads((RESULTS / f"{n}.json").read_text()) for n in args.merge.split(",")]
        rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: (list(CASES).index(r["case"]), list(METHODS).index(r["method"]), r["seed"]))
        write_json(RESULTS / f"{args.out}.json", {"host": parts[0]["host"], "cases": CASES, "methods": METHODS, "rows": rows,
                                                  "merged_from": args.merge.split(",")})
        write_text(RESULTS / f"{args.out}.md", "# Distillation benchmark\n\nCommands: " + "; ".join(
            f"`python benchmarks/distill/run.py --cases {','.join(sorted({r['case'] for r in p['rows']}, key=list(CASES).index))}`" for p in parts)
            + f"\n\nHeld-out accuracy (%), mean ± std over seeds:\n\n{render(rows)}")
        print(render(rows))
        return
    cases, methods = args.cases.split(","), args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    os.environ.setdefault("COMPRESSOR_CACHE", str(args.work / "cache"))
    preps = {c: prepare(c, args.work) for c in cases}
    jobs = [(c, m, s) for c in cases for m in methods for s in seeds]
    rows = []
    t0 = time.time()
    with ProcessPoolExecutor(args.workers) as pool:
        futs = {pool.submit(run_one, c, m, s, preps[c], args.work): (c, m, s) for c, m, s in jobs}
        for f in as_completed(futs):
            c, m, s = futs[f]
            try:
                r = f.result()
            except Exception as exc:  # record and go on: one broken method must not lose the rest
                r = {"case": c, "method": m, "seed": s, "skipped": f"failed: {type(exc).__name__}: {exc}"}
            rows.append(r)
            acc = f"{100 * r['student_acc']:.2f}" if "student_acc" in r else r.get("skipped")
            print(f"[{len(rows)}/{len(jobs)} {time.time() - t0:.0f}s] {c} {m} seed {s}: {acc}", flush=True)
    rows.sort(key=lambda r: (list(CASES).index(r["case"]), list(METHODS).index(r["method"]), r["seed"]))
    RESULTS.mkdir(exist_ok=True)
    from compressor._io import write_json, write_text
    from compressor.bench.host import describe_host

    write_json(RESULTS / f"{args.out}.json", {"host": describe_host(), "cases": CASES, "methods": METHODS, "rows": rows})
    md = render(rows)
    write_text(RESULTS / f"{args.out}.md", f"# Distillation benchmark\n\nCommand: `python benchmarks/distill/run.py --cases {args.cases} "
               f"--methods {args.methods} --seeds {args.seeds}`\n\nHeld-out accuracy (%), mean ± std over seeds:\n\n{md}")
    print(md)


if __name__ == "__main__":
    main()
