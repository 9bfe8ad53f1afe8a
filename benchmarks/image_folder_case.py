"""Image-folder acceptance case: a jittered-digits image folder, a small residual-CNN teacher, and the
literal CLI run `compress --teacher T --target cpu --data ROOT/train --out RUN --baseline`.

    python benchmarks/image_folder_case.py                 # writes benchmarks/results/image_folder_case.md
    python benchmarks/image_folder_case.py --work /tmp/ifc # keep the data, teacher and run there

Data (offline, no downloads): scikit-learn's `load_digits` (1,797 8×8 grayscale digits). The source digits
are split 80/20 per class *before* any image is made, so no test image shares a source with a training image.
Each image is a digit upscaled to 10-14 px, placed at a random offset in a 16×16 canvas, plus pixel noise;
`--train-copies` jittered images per training digit and `--test-copies` per test digit, written as PNGs in
the torchvision ImageFolder layout ROOT/{train,test}/<digit>/<n>.png (the tool picks test/ up as held-out).
The teacher (benchmarks/models.py:ImageResNet) is trained on the training images read with the tool's own
image-folder reader, so its inputs and class order are exactly what the CLI feeds it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def make_images(root: Path, *, size: int = 16, train_copies: int = 3, test_copies: int = 2, noise: float = 20.0, seed: int = 0) -> dict:
    """Write ROOT/train and ROOT/test PNG folders from sklearn digits; returns counts."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from compressor.data import stratified_split

    d = load_digits()
    src = (d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    y = d.target.astype(np.int64)
    train_idx, test_idx = stratified_split(y, 0.2, seed)
    rng = np.random.default_rng(seed)
    counts = {}
    for split, idx, copies in (("train", train_idx, train_copies), ("test", test_idx, test_copies)):
        n = 0
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
        for i in idx:
            for _ in range(copies):
                s = int(rng.integers(10, 15))  # digit height/width in pixels
                digit = np.asarray(Image.fromarray(src[i]).resize((s, s), Image.BILINEAR), np.float32)
                canvas = np.zeros((size, size), np.float32)
                oy, ox = rng.integers(0, size - s + 1, 2)
                canvas[oy:oy + s, ox:ox + s] = digit
                canvas += rng.normal(0.0, noise, canvas.shape)
                Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), mode="L").save(root / split / str(y[i]) / f"{n}.png")
                n += 1
        counts[split] = n
    counts["source_train"], counts["source_test"] = int(len(train_idx)), int(len(test_idx))
    return counts


def read_folder(folder: Path):
    """Images and labels exactly as the tool reads them (PIL 'L', /255, N×1×H×W float32, sorted class names)."""
    from compressor.config import DataConfig
    from compressor.data.image_folder import read_images, scan_image_folder

    classes, items = scan_image_folder(folder)
    with __import__("PIL.Image").Image.open(items[0][0]) as im:
        size = (im.size[1], im.size[0])
    x, y = read_images(items, size, 1, DataConfig())
    return x, y, classes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="Folder for the images, the teacher and the run (default runs/image_folder_case-<time>).")
    ap.add_argument("--train-copies", type=int, default=3)
    ap.add_argument("--test-copies", type=int, default=2)
    ap.add_argument("--teacher-epochs", type=int, default=8)
    ap.add_argument("--teacher-batch-size", type=int, default=128)
    ap.add_argument("--teacher-width", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=HERE / "results" / "image_folder_case.md")
    ap.add_argument("--recipes-for", type=Path, metavar="RUN",
                    help="Instead of a new case: on an existing run of this case, compare labels-only with KD at T=2 and T=4 "
                         "at 1,500 and 4,000 steps (the measurement behind the default temperature and minimum steps) "
                         "and write benchmarks/results/image_folder_recipes.md.")
    ap.add_argument("cli_args", nargs="*", help="Extra arguments for compress after '--' (e.g. -- --epochs 10).")
    args = ap.parse_args()
    if args.recipes_for:
        return recipes(args.recipes_for, HERE / "results" / "image_folder_recipes.md")

    import torch

    from models import train_image_teacher

    from compressor._io import atomic_path, write_text

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    work = (args.work or ROOT / "runs" / time.strftime("image_folder_case-%Y%m%d-%H%M%S")).resolve()
    data_root, run_dir, teacher_path = work / "digits", work / "run", work / "teacher.pt"
    if (data_root / "train").exists() or run_dir.exists():
        sys.exit(f"{work} already holds a case; pass a fresh --work")
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    counts = make_images(data_root, train_copies=args.train_copies, test_copies=args.test_copies, seed=args.seed)
    t_data = time.perf_counter() - t0
    print(f"data: {counts['train']} train / {counts['test']} test PNGs under {data_root} ({t_data:.1f} s)", flush=True)

    t0 = time.perf_counter()
    torch.set_num_threads(2)
    x, y, classes = read_folder(data_root / "train")
    xt, yt, test_classes = read_folder(data_root / "test")
    assert classes == test_classes == [str(c) for c in range(10)]
    model = train_image_teacher(x, y, epochs=args.teacher_epochs, batch_size=args.teacher_batch_size, seed=args.seed, width=args.teacher_width)
    with torch.no_grad():
        t_acc = float((model(torch.from_numpy(xt)).argmax(1).numpy() == yt).mean())
    with atomic_path(teacher_path) as tmp:
        torch.jit.save(torch.jit.script(model), str(tmp))
    t_params = int(sum(p.numel() for p in model.parameters()))
    t_teacher = time.perf_counter() - t0
    print(f"teacher: ImageResNet width {args.teacher_width}, {t_params:,} params, held-out accuracy {t_acc:.4f} ({t_teacher:.1f} s)", flush=True)

    compress = Path(sys.executable).with_name("compress")
    cmd = [str(compress), "--teacher", str(teacher_path), "--target", "cpu", "--data", str(data_root / "train"),
           "--out", str(run_dir), "--baseline", *args.cli_args]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    t_cli = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"compress exited with {proc.returncode} after {t_cli:.1f} s")
    rep = json.loads((run_dir / "report.json").read_text())
    t_total = time.perf_counter() - t_start

    d = rep["data"]
    lines = [
        "# Image-folder acceptance case (digits, residual-CNN teacher, `--target cpu`)",
        "",
        f"Made by `python benchmarks/image_folder_case.py{' -- ' + ' '.join(args.cli_args) if args.cli_args else ''}` on "
        f"{rep['host']['cpu']} ({rep['host']['cpu_count']} cores), {time.strftime('%Y-%m-%d')}.",
        "",
        f"**Data.** scikit-learn `load_digits` (1,797 8×8 grayscale digits, 10 classes), source digits split 80/20 per class "
        f"({counts['source_train']} / {counts['source_test']}) before any image is made. Each PNG is one digit upscaled to 10–14 px "
        f"at a random offset in a 16×16 canvas with Gaussian pixel noise (σ = 20/255): {args.train_copies} images per training digit "
        f"({counts['train']} in `train/`), {args.test_copies} per test digit ({counts['test']} in `test/`, the tool's held-out set). "
        f"The tool read {d['train_labeled']} labeled training rows and {d['heldout']} held-out rows ({d['heldout_source']}).",
        "",
        f"**Teacher.** `benchmarks/models.py:ImageResNet` (stem conv + 3 residual blocks with BatchNorm and skips, global average pool, "
        f"linear head), width {args.teacher_width}, {t_params:,} parameters, {args.teacher_epochs} epochs at batch {args.teacher_batch_size}, "
        f"saved as TorchScript; "
        f"held-out accuracy {t_acc * 100:.2f}% (chance 10%).",
        "",
        "**Command.** `" + " ".join(["compress", "--teacher", "teacher.pt", "--target", "cpu", "--data", "digits/train", "--out", "run",
                                     "--baseline", *args.cli_args]) + "` (default student: built by the tool from the data shape).",
        "",
        "| model | format | accuracy % | agrees w/ teacher % | p50 ms | p99 ms | params | size KiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in rep["models"]:
        lat = m["latency_ms"]
        lines.append(f"| {m['name']} | {m['format']} {m['precision']} | {m['accuracy'] * 100:.2f} | {m['agreement'] * 100:.2f} | "
                     f"{lat['p50']:.3f} | {lat['p99']:.3f} | {m['params']:,} | {m['size_bytes'] / 1024:.1f} |")
    m0 = rep["models"][0]
    q = rep["checks"]["quantize"]
    lines += [
        "",
        f"Latency: batch {m0.get('batch_size', 1)}, {m0.get('threads', '?')} threads, on this host. INT8 recipe {q['recipe']} "
        f"(agrees with FP32 on {q['agreement_with_fp32'] * 100:.2f}% of unseen training rows).",
        "",
        f"Wall time: {t_total:.0f} s in all — data {t_data:.0f} s, teacher training {t_teacher:.0f} s, `compress` {t_cli:.0f} s "
        f"(1-minute load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores: "
        f"above the core count means other work shared the CPU and inflated times and latency tails).",
    ]
    by = {m["name"]: m for m in rep["models"]}
    kd, base = by.get("student"), next((m for m in rep["models"] if m["name"].startswith("baseline")), None)
    if kd and base:
        lines += ["", f"KD student minus labels-only baseline: {(kd['accuracy'] - base['accuracy']) * 100:+.2f} accuracy points "
                  f"({len(yt)} held-out images, so one image is {100 / len(yt):.2f} points); validation accuracy during training "
                  f"{rep['checks']['distill']['student']['val_accuracy'] * 100:.2f}% (KD) vs "
                  f"{rep['checks']['distill']['baseline']['val_accuracy'] * 100:.2f}% (labels only)."]
    lines += ["", *[f"Note: {n}" for n in rep.get("notes", [])[1:]]] if rep.get("notes", [])[1:] else []
    text = "\n".join(lines) + "\n"
    write_text(args.results, text)
    print("\n" + text)
    print(f"written: {args.results}")


def recipes(run_dir: Path, out: Path) -> None:
    """Labels-only vs KD (T=2, T=4) with the same trainer, split and student, at two schedule lengths."""
    import torch

    from run_benchmarks import train_variant

    torch.set_num_threads(2)
    rows = []
    for steps in (1500, 4000):
        for name, loss, kw in (("labels only", "labels", {}), ("KD T=2", "kd", {"temperature": 2.0}), ("KD T=4", "kd", {"temperature": 4.0})):
            acc = train_variant(run_dir, loss, steps=steps, **kw)
            rows.append((steps, name, acc))
            print(steps, name, f"{acc:.4f}", flush=True)
    lines = ["# Digits image-folder case: labels only vs KD by temperature and schedule length", "",
             f"`python benchmarks/image_folder_case.py --recipes-for {run_dir}`: the run's default student retrained by the "
             "same trainer on the same split (seed 0), α = 0.5; held-out accuracy.", "",
             "| steps | labels only % | KD T=2 % | KD T=4 % |", "|---|---|---|---|"]
    for steps in (1500, 4000):
        accs = {n: a for s, n, a in rows if s == steps}
        lines.append(f"| {steps} | {accs['labels only'] * 100:.2f} | {accs['KD T=2'] * 100:.2f} | {accs['KD T=4'] * 100:.2f} |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
