"""An acceptance case shaped like the benchmark but on data the defaults were not chosen on: mnist1d
generated with another seed, written to an .npz (4,000 labels, 40,000 unlabeled rows, x_test/y_test),
a TorchScript CNN teacher trained on the labeled rows, and the fixed student factory; then the literal
command runs:

    compress --teacher teacher.pt --target jetson --data train.npz --student benchmarks/models.py:student --out RUN --baseline

    python benchmarks/npz_case.py [--data-seed 1234] [--work runs/npz-case]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from models import train_teacher  # noqa: E402
from run_benchmarks import _labels_only  # noqa: E402

from compressor.data._mnist1d import generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-seed", type=int, default=1234)
    ap.add_argument("--labels", type=int, default=4000)
    ap.add_argument("--work", type=Path, default=Path("runs/npz-case"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "npz_case.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    d = generate(55000, seed=args.data_seed)
    y = d["y"].copy()
    y[args.labels:] = -1
    data = args.work / "train.npz"
    np.savez(data, x=d["x"], y=y, x_test=d["x_test"], y_test=d["y_test"])
    t0 = time.perf_counter()
    teacher = train_teacher(d["x"][: args.labels], d["y"][: args.labels])
    torch.jit.save(torch.jit.script(teacher), str(args.work / "teacher.pt"))
    teacher_s = time.perf_counter() - t0

    run = args.work / "run"
    cmd = ["compress", "--teacher", str(args.work / "teacher.pt"), "--target", "jetson", "--data", str(data),
           "--student", f"{HERE / 'models.py'}:student", "--out", str(run), "--baseline", "--force"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    rep = json.loads((run / "report.json").read_text())
    by = {m["name"]: m for m in rep["models"]}
    best_labels = max(by["baseline (labels only)"]["accuracy"], _labels_only(run, 64, 0))
    kd, teacher_acc = by["student"]["accuracy"], by["teacher"]["accuracy"]
    fp32, int8 = by["student onnx fp32"]["accuracy"], by["student onnx int8"]["accuracy"]
    lines = [
        f"# npz acceptance case (mnist1d data seed {args.data_seed})", "",
        f"`{' '.join(cmd[:-1])}` — {wall:.0f} s wall on {rep['host']['cpu']} ({rep['host']['cpu_count']} cores); "
        f"teacher training beforehand {teacher_s:.0f} s.", "",
        "| model | accuracy % | agreement % | p50 ms | params |", "|---|---|---|---|---|",
    ]
    lines += [f"| {m['name']} | {m['accuracy'] * 100:.2f} | {m['agreement'] * 100:.2f} | {m['latency_ms']['p50']:.3f} | {m['params']:,} |"
              for m in rep["models"]]
    lines += ["", f"Best labels-only training of the same student (same recipe, or batch 64): {best_labels * 100:.2f}%.",
              f"KD − best labels-only: {(kd - best_labels) * 100:+.2f} points (needs ≥ +1); teacher − KD: {(teacher_acc - kd) * 100:.2f} "
              f"points (needs ≤ 1.5); FP32 − INT8: {(fp32 - int8) * 100:.2f} points (needs ≤ 1)."]
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
