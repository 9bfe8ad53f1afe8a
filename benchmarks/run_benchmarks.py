"""The mnist1d few-label benchmark: 4,000 labels plus a 40,000-row unlabeled pool, the built-in CNN
teacher (44k parameters) and a fixed student with about a tenth of its parameters, at 3 seeds.

    python benchmarks/run_benchmarks.py              # the table (teacher, labels-only, KD, INT8) at 3 seeds
    python benchmarks/run_benchmarks.py --sweep      # the distillation-recipe sweep that chose the defaults

Every figure comes from the real pipeline (compressor.api.compress) except the extra labels-only runs,
which call the same trainer directly with other batch sizes so that "labels only" is its best, not a strawman.
Results go to benchmarks/results/ as Markdown and JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STUDENT = f"{HERE / 'models.py'}:student"


def _configs(seed: int, **distill):
    from compressor.config import BenchConfig, CompressConfig, DataConfig, DistillConfig

    return CompressConfig(teacher=None, target="jetson", data=DataConfig(seed=seed),
                          distill=DistillConfig(student=STUDENT, seed=seed, baseline=True, **distill),
                          bench=BenchConfig(min_runs=300, min_duration_s=1.0))


def train_variant(run_dir: Path, loss: str, steps: int | None = None, seed: int = 0, **overrides) -> float:
    """Held-out accuracy of the run's student retrained with another loss ('kd' or 'labels') or settings, by the
    same trainer on the same split (labels-only uses the labeled training rows, KD the whole pool)."""
    import dataclasses

    import torch

    from compressor.data import stratified_split
    from compressor.distill.trainer import train_student
    from compressor.models import load_student
    from compressor.run import Run

    run = Run.open(run_dir)
    ds, cfg = run.data, dataclasses.replace(run.config.distill, **overrides)
    res = run.manifest["stages"]["distill"]["result"]
    keep, val = stratified_split(ds.y, cfg.val_fraction, cfg.seed)
    rows = np.setdiff1d(np.arange(len(ds.y)), val)
    teacher = None
    if loss == "labels":
        rows = rows[ds.y[rows] >= 0]
    else:
        teacher = np.load(run.path("cache/teacher_pool_logits.npy"))[rows]
    torch.manual_seed(seed)
    module = load_student(res["student_record"], input_shape=ds.input_shape, num_classes=res["num_classes"])
    tag = "-".join(f"{k}{v}" for k, v in sorted(overrides.items()))
    module, _ = train_student(module, ds.x[rows], ds.y[rows], teacher, ds.x[val], ds.y[val], cfg,
                              steps=steps or res["student"]["steps"], checkpoint=run_dir / "checkpoints" / f"variant-{loss}-{tag}.ckpt",
                              label=f"{loss} {tag}", loss_name=loss)
    with torch.inference_mode():
        return float((module(torch.from_numpy(ds.x_test)).argmax(1).numpy() == ds.y_test).mean())


def _labels_only(run_dir: Path, batch_size: int, seed: int) -> float:
    """Best-on-validation labels-only student with another batch size and the same number of steps."""
    return train_variant(run_dir, "labels", seed=seed, batch_size=batch_size)


def table(seeds: list[int], work: Path) -> dict:
    from compressor.api import compress

    rows = []
    for seed in seeds:
        t0 = time.perf_counter()
        rep = compress(_configs(seed), work / f"seed{seed}", force=True)
        wall = time.perf_counter() - t0
        by = {m["name"]: m for m in rep["models"]}
        extra = _labels_only(work / f"seed{seed}", 64, seed)
        d = rep["checks"]["distill"]
        rows.append({
            "seed": seed, "wall_s": wall,
            "teacher": by["teacher"]["accuracy"], "labels_only_same_recipe": by["baseline (labels only)"]["accuracy"],
            "labels_only_bs64": extra, "kd": by["student"]["accuracy"], "kd_onnx_fp32": by["student onnx fp32"]["accuracy"],
            "int8": by["student onnx int8"]["accuracy"],
            "teacher_params": by["teacher"]["params"], "student_params": by["student"]["params"],
            "p50_ms": {n: m["latency_ms"]["p50"] for n, m in by.items()},
            "kd_train_s": d["student"]["seconds"], "labels_train_s": d["baseline"]["seconds"],
            "int8_recipe": rep["checks"]["quantize"]["recipe"], "host": rep["host"]["cpu"],
        })
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def _fmt(vals, pct=True):
    k = 100 if pct else 1
    m = statistics.mean(vals) * k
    s = statistics.stdev(vals) * k if len(vals) > 1 else 0.0
    return f"{m:.2f} ± {s:.2f}"


def write_table(res: dict, out: Path) -> str:
    rows = res["rows"]
    best_lab = [max(r["labels_only_same_recipe"], r["labels_only_bs64"]) for r in rows]
    lines = [
        "# mnist1d few-label benchmark",
        "",
        f"4,000 labeled rows + 40,000 unlabeled, 11,000 held-out rows; teacher {rows[0]['teacher_params']:,} parameters "
        f"(built-in demo teacher), student {rows[0]['student_params']:,} parameters (`benchmarks/models.py:student`, "
        f"{rows[0]['student_params'] / rows[0]['teacher_params']:.1%} of the teacher). Seeds {', '.join(str(r['seed']) for r in rows)}; "
        "mean ± std of held-out accuracy (%). Latency: batch 1, 1 thread, p50 on "
        f"{rows[0]['host']}.",
        "",
        "| model | accuracy % | p50 ms (seed 0) |",
        "|---|---|---|",
        f"| teacher (PyTorch) | {_fmt([r['teacher'] for r in rows])} | {rows[0]['p50_ms']['teacher']:.3f} |",
        f"| student, labels only (same recipe as KD) | {_fmt([r['labels_only_same_recipe'] for r in rows])} | {rows[0]['p50_ms']['baseline (labels only)']:.3f} |",
        f"| student, labels only (batch 64) | {_fmt([r['labels_only_bs64'] for r in rows])} | |",
        f"| student, labels only (best of the two, per seed) | {_fmt(best_lab)} | |",
        f"| student, KD (PyTorch) | {_fmt([r['kd'] for r in rows])} | {rows[0]['p50_ms']['student']:.3f} |",
        f"| student, KD, ONNX FP32 | {_fmt([r['kd_onnx_fp32'] for r in rows])} | {rows[0]['p50_ms']['student onnx fp32']:.3f} |",
        f"| student, KD, ONNX INT8 ({rows[0]['int8_recipe']}) | {_fmt([r['int8'] for r in rows])} | {rows[0]['p50_ms']['student onnx int8']:.3f} |",
        "",
        f"KD minus best labels-only: {_fmt([r['kd'] - b for r, b in zip(rows, best_lab)])} points; "
        f"teacher minus KD: {_fmt([r['teacher'] - r['kd'] for r in rows])} points; "
        f"FP32 minus INT8: {_fmt([r['kd_onnx_fp32'] - r['int8'] for r in rows])} points.",
        f"Training time per run: KD {statistics.mean(r['kd_train_s'] for r in rows):.0f} s, labels only "
        f"{statistics.mean(r['labels_train_s'] for r in rows):.0f} s (same steps; KD reads cached teacher logits). "
        f"Whole pipeline per seed: {statistics.mean(r['wall_s'] for r in rows):.0f} s.",
    ]
    text = "\n".join(lines) + "\n"
    (out / "mnist1d.md").write_text(text)
    (out / "mnist1d.json").write_text(json.dumps(res, indent=2) + "\n")
    return text


def sweep(work: Path, out: Path) -> str:
    """Distillation recipes on seed 0: temperature, alpha, schedule length."""
    from compressor.api import distill
    from compressor.models import load_student

    import torch

    grid = [(1.0, 0.5, 60), (2.0, 0.5, 60), (4.0, 0.5, 60), (8.0, 0.5, 60), (4.0, 0.9, 60), (4.0, 0.5, 30)]
    rows = []
    for T, a, e in grid:
        cfg = _configs(0, temperature=T, alpha=a, epochs=float(e))
        cfg.distill.baseline = False
        run = distill(cfg, work / f"sweep-T{T}-a{a}-e{e}", force=True)
        ds = run.data
        res = run.manifest["stages"]["distill"]["result"]
        m = load_student(res["student_record"], input_shape=ds.input_shape, num_classes=res["num_classes"])
        m.load_state_dict(torch.load(run.path("student.pt"), weights_only=True))
        with torch.inference_mode():
            acc = float((m.eval()(torch.from_numpy(ds.x_test)).argmax(1).numpy() == ds.y_test).mean())
        rows.append({"temperature": T, "alpha": a, "epochs": e, "val": res["student"]["val_accuracy"], "heldout": acc})
        print(json.dumps(rows[-1]), flush=True)
    lines = ["# Distillation recipe sweep (mnist1d, seed 0)", "",
             "Validation accuracy picks the recipe; held-out accuracy shown for the record.", "",
             "| T | alpha | epochs | val % | held-out % |", "|---|---|---|---|---|"]
    lines += [f"| {r['temperature']:g} | {r['alpha']:g} | {r['epochs']} | {r['val'] * 100:.2f} | {r['heldout'] * 100:.2f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    (out / "kd_sweep.md").write_text(text)
    (out / "kd_sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=Path("runs/benchmarks"))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--sweep", action="store_true", help="run the recipe sweep instead of the table")
    args = ap.parse_args()
    import logging

    import torch

    torch.set_num_threads(2)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    print(sweep(args.work, args.out) if args.sweep else write_table(table(args.seeds, args.work), args.out))


if __name__ == "__main__":
    main()
