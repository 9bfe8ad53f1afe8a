"""Few labels + a folder of unlabeled images: does `--unlabeled` help?

    python benchmarks/unlabeled_case.py                  # writes benchmarks/results/unlabeled_case.{md,json}
    python benchmarks/unlabeled_case.py --work /tmp/uc   # keep the data, teacher and runs there

Data and teacher come from benchmarks/image_folder_case.py (imported, not copied): jittered 16×16 PNG digits
from scikit-learn's `load_digits` in ROOT/digits/{train,test}/<digit>/, and an ImageResNet teacher trained on ALL
the training images with their labels (it stands for a model trained elsewhere on more data), saved as TorchScript.

Then a few-labels split: `--labeled-fraction` of each class of digits/train (stratified, seeded, at least 2 per class)
is hard-linked (or copied) to few/train/<digit>/, the held-out digits/test to few/test/, and every other training
image to pool/part<k>/<n>.png (no class folders, shuffled names). Three runs of the full `compress` pipeline with
the same seed, steps and (default) student, each scored on few/test by the tool's own report.json:

    A  --data few/train                                  distilled from the teacher, labeled images only
    B  --data few/train --unlabeled pool                 the same plus the unlabeled pool, labeled softly by the teacher
    C  --data few/train --loss labels                    labels only, no teacher (the baseline)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from image_folder_case import make_images, read_folder


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def few_labels_split(train: Path, test: Path, few: Path, pool: Path, *, fraction: float, seed: int, parts: int = 4) -> dict:
    """few/train/<class>/ (fraction per class, >= 2), few/test/ (= test), pool/part<k>/<n>.png (all other train images)."""
    rng = np.random.default_rng(seed)
    labeled, rest = 0, []
    for cdir in sorted(p for p in train.iterdir() if p.is_dir()):
        files = sorted(cdir.iterdir())
        order = rng.permutation(len(files))
        k = min(len(files), max(2, round(fraction * len(files))))
        for i in order[:k]:
            _link(files[i], few / "train" / cdir.name / files[i].name)
        labeled += k
        rest += [files[i] for i in order[k:]]
    for i, j in enumerate(rng.permutation(len(rest))):  # shuffled names: neither the path nor the name tells the class
        _link(rest[j], pool / f"part{i % parts}" / f"{i}.png")
    heldout = 0
    for f in sorted(test.rglob("*.png")):
        _link(f, few / "test" / f.relative_to(test))
        heldout += 1
    return {"labeled": labeled, "unlabeled": len(rest), "heldout": heldout}


def host_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="Folder for the images, the teacher and the runs (default runs/unlabeled_case-<time>).")
    ap.add_argument("--labeled-fraction", type=float, default=0.05, help="Share of each class kept labeled (default 0.05, at least 2 per class).")
    ap.add_argument("--steps", type=int, default=600, help="Optimiser steps for every run (default 600).")
    ap.add_argument("--train-copies", type=int, default=3)
    ap.add_argument("--test-copies", type=int, default=2)
    ap.add_argument("--teacher-epochs", type=int, default=8)
    ap.add_argument("--teacher-batch-size", type=int, default=128)
    ap.add_argument("--teacher-width", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=HERE / "results" / "unlabeled_case.md")
    args = ap.parse_args()

    import torch

    from models import train_image_teacher

    from compressor._io import atomic_path, write_text

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    work = (args.work or ROOT / "runs" / time.strftime("unlabeled_case-%Y%m%d-%H%M%S")).resolve()
    if work.exists() and any(work.iterdir()):
        sys.exit(f"{work} is not empty; pass a fresh --work")
    work.mkdir(parents=True, exist_ok=True)
    digits, few, pool, teacher_path = work / "digits", work / "few", work / "pool", work / "teacher.pt"

    t0 = time.perf_counter()
    counts = make_images(digits, train_copies=args.train_copies, test_copies=args.test_copies, seed=args.seed)
    split = few_labels_split(digits / "train", digits / "test", few, pool, fraction=args.labeled_fraction, seed=args.seed)
    t_data = time.perf_counter() - t0
    print(f"data: {counts['train']} train images -> {split['labeled']} labeled + {split['unlabeled']} unlabeled; "
          f"{split['heldout']} held out ({t_data:.1f} s)", flush=True)

    t0 = time.perf_counter()
    torch.set_num_threads(2)
    x, y, _ = read_folder(digits / "train")
    xt, yt, _ = read_folder(digits / "test")
    model = train_image_teacher(x, y, epochs=args.teacher_epochs, batch_size=args.teacher_batch_size, seed=args.seed, width=args.teacher_width)
    with torch.no_grad():
        t_acc = float((model(torch.from_numpy(xt)).argmax(1).numpy() == yt).mean())
    with atomic_path(teacher_path) as tmp:
        torch.jit.save(torch.jit.script(model), str(tmp))
    t_params = int(sum(p.numel() for p in model.parameters()))
    t_teacher = time.perf_counter() - t0
    del x, xt
    print(f"teacher: ImageResNet width {args.teacher_width}, {t_params:,} params, trained on all {len(y)} labeled images, "
          f"held-out accuracy {t_acc:.4f} ({t_teacher:.1f} s)", flush=True)

    common = ["--teacher", "teacher.pt", "--data", "few/train", "--target", "cpu", "--steps", str(args.steps),
              "--seed", str(args.seed), "--no-baseline"]
    runs = [("A", "distilled, labeled only", [*common, "--out", "runA"]),
            ("B", "distilled, labeled + --unlabeled pool", [*common, "--unlabeled", "pool", "--out", "runB"]),
            ("C", "labels only (no teacher)", [*common, "--loss", "labels", "--out", "runC"])]
    results = []
    for key, name, argv in runs:
        cmd = [sys.executable, "-m", "compressor.cli", *argv]
        print(f"$ (cd {work} && python -m compressor.cli {' '.join(argv)})", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, check=False, cwd=work, env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"run {key} exited with {proc.returncode} after {wall:.1f} s")
        rep = json.loads((work / f"run{key}" / "report.json").read_text())
        by = {m["name"]: m for m in rep["models"]}
        dist = rep.get("checks", {}).get("distill", {}).get("student", {})
        results.append({"run": key, "name": name, "command": "python -m compressor.cli " + " ".join(argv),
                        "student_accuracy": by["student"]["accuracy"], "student_agreement": by["student"].get("agreement"),
                        "teacher_accuracy": by["teacher"]["accuracy"] if "teacher" in by else None,
                        "val_accuracy": dist.get("val_accuracy"), "loss": rep.get("configs", {}).get("distill", {}).get("loss"),
                        "train_labeled": rep["data"]["train_labeled"], "train_unlabeled": rep["data"]["train_unlabeled"],
                        "heldout": rep["data"]["heldout"], "student_params": by["student"]["params"], "wall_s": wall})
        print(f"run {key}: student held-out accuracy {by['student']['accuracy']:.4f} ({wall:.1f} s)", flush=True)
    t_total = time.perf_counter() - t_start

    r = {x["run"]: x for x in results}
    teacher_report = next((x["teacher_accuracy"] for x in results if x["teacher_accuracy"] is not None), t_acc)
    n_held = r["A"]["heldout"]
    pts = lambda a, b: (a - b) * 100
    summary = {
        "host": {"cpu": host_cpu(), "cores": os.cpu_count(), "load_1min_start": load_start, "load_1min_end": os.getloadavg()[0]},
        "date": time.strftime("%Y-%m-%d"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {**split, "source_train_digits": counts["source_train"], "source_test_digits": counts["source_test"],
                 "train_images": counts["train"]},
        "teacher": {"params": t_params, "heldout_accuracy": teacher_report, "heldout_accuracy_script": t_acc, "train_s": t_teacher},
        "runs": results,
        "diff_points": {"B_minus_A": pts(r["B"]["student_accuracy"], r["A"]["student_accuracy"]),
                        "B_minus_C": pts(r["B"]["student_accuracy"], r["C"]["student_accuracy"]),
                        "A_minus_C": pts(r["A"]["student_accuracy"], r["C"]["student_accuracy"])},
        "wall_s": {"data": t_data, "teacher": t_teacher, "total": t_total},
    }
    json_path = args.results.with_suffix(".json")
    write_text(json_path, json.dumps(summary, indent=2) + "\n")

    loss = r["A"]["loss"] or "the default"
    lines = [
        "# Few labels + `--unlabeled`: digits image folder, residual-CNN teacher",
        "",
        f"Made by `python benchmarks/unlabeled_case.py` on {summary['host']['cpu']} ({os.cpu_count()} cores), {summary['date']}; "
        f"data and teacher from `benchmarks/image_folder_case.py`.",
        "",
        f"**Data.** {counts['train']} jittered 16×16 training PNGs ({args.train_copies} per source digit, {counts['source_train']} "
        f"source digits) and {split['heldout']} held-out PNGs from separate source digits. Labeled: {split['labeled']} "
        f"({args.labeled_fraction:.0%} per class, stratified, seed {args.seed}) in `few/train/<digit>/`; unlabeled: the other "
        f"{split['unlabeled']} in `pool/part0..3/` (no class folders); held out: `few/test/` ({n_held} images, one image = "
        f"{100 / n_held:.2f} points).",
        "",
        f"**Teacher.** ImageResNet width {args.teacher_width} ({t_params:,} params), trained on all {counts['train']} labeled "
        f"training images, TorchScript; held-out accuracy {teacher_report * 100:.2f}%.",
        "",
        f"**Runs.** Full pipeline, same seed ({args.seed}), {args.steps} steps, default student "
        f"({r['A']['student_params']:,} params); A and B use the tool's default loss ({loss}); accuracy is the FP32 student on "
        f"`few/test/` from each run's `report.json`.",
        "",
        "| run | student | training rows (labeled + unlabeled) | held-out accuracy % | validation accuracy % | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for x in results:
        va = f"{x['val_accuracy'] * 100:.2f}" if x["val_accuracy"] is not None else "–"
        lines.append(f"| {x['run']} | {x['name']} | {x['train_labeled']} + {x['train_unlabeled']} | "
                     f"{x['student_accuracy'] * 100:.2f} | {va} | {x['wall_s']:.0f} |")
    d = summary["diff_points"]
    lines += [
        "",
        f"B − A (what `--unlabeled` adds): **{d['B_minus_A']:+.2f} points**; B − C: {d['B_minus_C']:+.2f}; "
        f"A − C (distillation on the labeled images alone): {d['A_minus_C']:+.2f}. Teacher: {teacher_report * 100:.2f}%.",
        "",
        "Validation accuracy is the tool's split of the labeled rows (a few dozen images), so it is coarse. The teacher was "
        "trained on the pool images with their labels (it stands for a model trained on more data), so its soft labels on "
        "the pool are about as good as they get.",
        "",
        f"Wall time: {t_total:.0f} s in all — data {t_data:.0f} s, teacher {t_teacher:.0f} s, runs "
        f"{' / '.join(format(x['wall_s'], '.0f') for x in results)} s (1-minute load average {load_start:.1f} at the start, "
        f"{summary['host']['load_1min_end']:.1f} at the end, on {os.cpu_count()} cores: above the core count means other work "
        f"shared the CPU and inflated the times, not the accuracies).",
        "",
        "**Commands** (in the work folder; the script runs them):",
        "",
        "```",
        *[x["command"] for x in results],
        "```",
    ]
    text = "\n".join(lines) + "\n"
    write_text(args.results, text)
    print("\n" + text)
    print(f"written: {args.results} and {json_path}")


if __name__ == "__main__":
    main()
