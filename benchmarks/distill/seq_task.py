"""A synthetic sequence-classification case for token-id students, generated locally with numpy.

The task: sequences of 32 token ids from a vocabulary of 32. Token 31 is a marker that occurs exactly once, at a
random position p in 0..30; the class is x[p+1] mod 8, read off the token right after the marker. Every other
token is uniform over 0..30, so a bag of tokens (counts, a mean-pooled embedding) says almost nothing (about 20%,
chance is 12.5%): a model must relate neighbouring positions (attend from one position to the one before it and
check for the marker). Transformers sit on that bag-of-tokens plateau for a few hundred steps before the attention
pattern forms, then jump to the ceiling. 5% of the labels (train and held-out alike) are replaced by a random
class, so 95.6% is the best any model can score.

    python benchmarks/distill/seq_task.py [--out runs/seq-task] [--pool 20000] [--labels 2000] [--test 4000]

writes OUT/seq.npz (x int64 (N, 32); y with -1 for every pool row after the first --labels; x_test, y_test),
trains the teacher (seq_models.py:build, a 4-layer d_model-64 nn.TransformerEncoder) on the pool rows with their
labels (never the held-out rows; --teacher-rows labeled restricts it to the --labels rows the student sees) on one
CPU thread, saves its state dict to OUT/seq_teacher.pt, an ONNX copy to OUT/seq_teacher.onnx and its accuracy and
training time to OUT/seq_teacher.json, and prints the command that distils it:

    compress --teacher OUT/seq_teacher.pt --teacher-arch benchmarks/distill/seq_models.py:build --data OUT/seq.npz \\
             --student benchmarks/distill/seq_models.py:tiny --target cpu --out OUT/run
    (or --student teacher:every-other: the teacher's blocks 0 and 2, with its weights)

prepare(work) does the same once per work folder, for benchmarks/distill/run.py.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
VOCAB, LENGTH, CLASSES, MARKER = 32, 32, 8, 31


def make_rows(n: int, rng: np.random.Generator, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """n rows of the task: x int64 (n, LENGTH), y int64 (n,) with a `noise` fraction of labels drawn at random."""
    x = rng.integers(0, MARKER, (n, LENGTH), dtype=np.int64)  # 0..30: never the marker
    p = rng.integers(0, LENGTH - 1, n)
    rows = np.arange(n)
    x[rows, p] = MARKER
    y = x[rows, p + 1] % CLASSES
    flip = rng.random(n) < noise
    y[flip] = rng.integers(0, CLASSES, int(flip.sum()))
    return x, y.astype(np.int64)


def write_npz(path: Path, pool: int = 20000, labels: int = 2000, test: int = 4000, seed: int = 0, noise: float = 0.05) -> dict:
    """Write the .npz (x, y with -1 beyond the first `labels` rows, x_test, y_test); returns the arrays with y_true."""
    rng = np.random.default_rng(seed)
    x, y_true = make_rows(pool, rng, noise)
    x_test, y_test = make_rows(test, rng, noise)
    y = y_true.copy()
    y[labels:] = -1
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)
    return {"x": x, "y": y, "y_true": y_true, "x_test": x_test, "y_test": y_test}


def accuracy(model, x: np.ndarray, y: np.ndarray, batch: int = 1024) -> float:
    import torch

    model.eval()
    with torch.inference_mode():
        pred = np.concatenate([model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() for i in range(0, len(x), batch)])
    return float((pred == y).mean())


def train_teacher(x: np.ndarray, y: np.ndarray, steps: int = 1500, batch: int = 64, lr: float = 3e-3, seed: int = 0,
                  x_eval: np.ndarray | None = None, y_eval: np.ndarray | None = None, log=print, **arch):
    """Train seq_models.build(**arch) on (x, y) with AdamW, warm-up + cosine; returns (model, history)."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(HERE))
    from seq_models import build

    torch.manual_seed(seed)
    model = build(**arch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    history, t0 = [], time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(xt), (batch,), generator=gen)
        loss = F.cross_entropy(model(xt[idx]), yt[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if x_eval is not None and (step % 250 == 0 or step == steps):
            acc = accuracy(model, x_eval, y_eval)
            model.train()
            history.append({"step": step, "loss": round(loss.item(), 4), "eval_accuracy": acc, "seconds": round(time.perf_counter() - t0, 1)})
            log(f"teacher step {step}/{steps}: loss {loss.item():.3f}, held-out accuracy {acc:.4f} ({time.perf_counter() - t0:.0f} s)")
    return model.eval(), history


def bag_of_tokens_accuracy(x, y, x_test, y_test) -> float:
    """A small MLP on token counts (no positions): how far a model gets without relating positions."""
    import torch
    import torch.nn.functional as F

    def counts(a):
        c = np.zeros((len(a), VOCAB), np.float32)
        np.add.at(c, (np.repeat(np.arange(len(a)), a.shape[1]), a.ravel()), 1.0)
        return torch.from_numpy(c / a.shape[1])

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(VOCAB, 128), torch.nn.ReLU(), torch.nn.Linear(128, CLASSES))
    opt = torch.optim.Adam(lin.parameters(), lr=3e-3)
    xc, yt = counts(x), torch.from_numpy(y)
    for _ in range(600):
        idx = torch.randint(0, len(xc), (256,))
        loss = F.cross_entropy(lin(xc[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((lin(counts(x_test)).argmax(1).numpy() == y_test).mean())


def prepare(work: Path, *, pool: int = 20000, labels: int = 2000, test: int = 4000, noise: float = 0.05, seed: int = 0,
            teacher_rows: str = "pool", steps: int = 1500, threads: int = 1, force: bool = False, log=print) -> dict:
    """Make the case in `work` (reused when it is already there with the same settings): seq.npz, the teacher's state
    dict seq_teacher.pt, an ONNX copy seq_teacher.onnx (opset 17, dynamic batch, int64 input) and seq_teacher.json.
    Returns their paths plus the --teacher-arch and --student specs."""
    import torch

    work = Path(work)
    arch_file = HERE / "seq_models.py"
    paths = {"data": work / "seq.npz", "teacher": work / "seq_teacher.pt", "onnx": work / "seq_teacher.onnx",
             "info": work / "seq_teacher.json", "arch": f"{arch_file}:build", "student": f"{arch_file}:tiny"}
    settings = {"pool": pool, "labels": labels, "test": test, "noise": noise, "seed": seed, "teacher_rows": teacher_rows, "steps": steps}
    if not force and all(Path(paths[k]).exists() for k in ("data", "teacher", "onnx", "info")):
        info = json.loads(paths["info"].read_text())
        if info.get("settings") == settings:
            return {**paths, "teacher_info": info}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        d = write_npz(paths["data"], pool, labels, test, seed, noise)
        rows = np.arange(pool) if teacher_rows == "pool" else np.arange(labels)
        log(f"wrote {paths['data']}: {pool} pool rows ({labels} labeled), {test} held out; the teacher trains on {len(rows)} of the pool's rows")
        t0 = time.perf_counter()
        model, history = train_teacher(d["x"][rows], d["y_true"][rows], steps=steps, seed=seed,
                                       x_eval=d["x_test"][:1000], y_eval=d["y_test"][:1000], log=log)
        seconds = time.perf_counter() - t0
        acc = accuracy(model, d["x_test"], d["y_test"])
        bag = bag_of_tokens_accuracy(d["x"][rows], d["y_true"][rows], d["x_test"], d["y_test"])
    finally:
        torch.set_num_threads(old_threads)
    torch.save(model.state_dict(), paths["teacher"])
    torch.onnx.export(model, (torch.from_numpy(d["x_test"][:2]),), str(paths["onnx"]), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    info = {"teacher_accuracy": acc, "teacher_seconds": round(seconds, 1), "threads": threads,
            "params": int(sum(p.numel() for p in model.parameters())),
            "bayes_accuracy": round(1 - noise * (CLASSES - 1) / CLASSES, 4),  # the best possible score given the label noise
            "bag_of_tokens_accuracy": bag, "chance": 1 / CLASSES, "teacher_train_rows": int(len(rows)),
            "settings": settings, "history": history}
    paths["info"].write_text(json.dumps(info, indent=2) + "\n")
    return {**paths, "teacher_info": info}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/seq-task"))
    ap.add_argument("--pool", type=int, default=20000, help="training rows (labeled + unlabeled)")
    ap.add_argument("--labels", type=int, default=2000, help="pool rows that keep their label in the .npz; the rest get -1")
    ap.add_argument("--test", type=int, default=4000, help="held-out rows (x_test, y_test)")
    ap.add_argument("--noise", type=float, default=0.05, help="fraction of labels replaced by a random class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-rows", choices=["pool", "labeled"], default="pool",
                    help="train the teacher on every pool row's label (default: a teacher trained on more labels than the student "
                         "gets, like a large pre-trained model) or only on the --labels rows the student sees")
    ap.add_argument("--steps", type=int, default=1500, help="teacher optimiser steps (batch 64)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true", help="remake the files even when they exist with the same settings")
    args = ap.parse_args(argv)
    p = prepare(args.out, pool=args.pool, labels=args.labels, test=args.test, noise=args.noise, seed=args.seed,
                teacher_rows=args.teacher_rows, steps=args.steps, threads=args.threads, force=args.force)
    info = p["teacher_info"]
    print(f"teacher: held-out accuracy {info['teacher_accuracy']:.4f} (best possible {info['bayes_accuracy']:.4f}; bag of tokens "
          f"{info['bag_of_tokens_accuracy']:.4f}; chance {info['chance']:.3f}), {info['params']:,} parameters, trained in "
          f"{info['teacher_seconds']:.0f} s on {info['threads']} thread(s); saved {p['teacher']} and {p['onnx']}")
    print(f"distil it with:\n  compress --teacher {p['teacher']} --teacher-arch {p['arch']} --data {p['data']} --student {p['student']} "
          f"--target cpu --out {args.out / 'run'}")
    return info


if __name__ == "__main__":
    main()
