"""The image case of the --student auto benchmark: a residual CNN teacher on 32×32 RGB digits.

The data: scikit-learn's 8×8 digits (shipped with the package, nothing downloaded), split by source image into a pool
side and a held-out side first (no source digit is on both), then each drawn many times at 32×32 with a random scale,
shift, rotation, colour and background noise. The teacher: a ResNet-style net (a stem, a stride-2 convolution and a
stack of six residual blocks at 16×16, global pool, linear head), trained on every pool row's label; the student gets
10% of the labels and the whole pool. Usable as --teacher-arch benchmarks/auto_task.py:build_teacher.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNetSmall(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 48, blocks: int = 6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width // 2, 3, padding=1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU(),
                                  nn.Conv2d(width // 2, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*[BasicBlock(width) for _ in range(blocks)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def build_teacher() -> nn.Module:
    return ResNetSmall()


def _draw(digits: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator, size: int = 32):
    """n 32×32 RGB images drawn from 8×8 digits with a random affine warp, colour and noise."""
    src = torch.from_numpy(digits.astype(np.float32) / 16.0).unsqueeze(1)  # (K, 1, 8, 8) in [0, 1]
    pick = rng.integers(0, len(src), n)
    scale = rng.uniform(0.7, 1.1, n)
    angle = rng.uniform(-0.35, 0.35, n)
    shift = rng.uniform(-0.25, 0.25, (n, 2))
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    theta = np.stack([np.stack([cos, -sin, shift[:, 0]], 1), np.stack([sin, cos, shift[:, 1]], 1)], 1).astype(np.float32)
    grid = nn.functional.affine_grid(torch.from_numpy(theta), (n, 1, size, size), align_corners=False)
    ink = nn.functional.grid_sample(src[pick], grid, align_corners=False, padding_mode="zeros")  # (n, 1, S, S)
    fg = torch.from_numpy(rng.uniform(0.3, 1.0, (n, 3, 1, 1)).astype(np.float32))
    bg = torch.from_numpy(rng.uniform(0.0, 0.5, (n, 3, 1, 1)).astype(np.float32))
    noise = torch.from_numpy(rng.normal(0, 0.12, (n, 3, size, size)).astype(np.float32))
    x = (bg + (fg - bg) * ink + noise).clamp(0, 1)
    x = (x - 0.5) / 0.25
    return x.numpy().astype(np.float32), labels[pick].astype(np.int64)


def write_npz(path: Path, pool: int = 8000, labels: int = 800, test: int = 2000, seed: int = 0) -> dict:
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(d.target))
    held = order[: len(order) // 5]
    train = order[len(order) // 5:]
    x, y_true = _draw(d.images[train], d.target[train], pool, rng)
    x_test, y_test = _draw(d.images[held], d.target[held], test, rng)
    y = np.full(pool, -1, np.int64)
    lab = rng.choice(pool, labels, replace=False)
    y[lab] = y_true[lab]
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)
    return {"x": x, "y": y, "y_true": y_true, "x_test": x_test, "y_test": y_test}


def accuracy(model, x, y, batch: int = 512) -> float:
    model.eval()
    with torch.inference_mode():
        pred = np.concatenate([model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() for i in range(0, len(x), batch)])
    return float((pred == y).mean())


def train_teacher(x, y, epochs: int = 12, batch: int = 64, lr: float = 3e-3, seed: int = 0, log=print) -> nn.Module:
    torch.manual_seed(seed)
    model = build_teacher()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = epochs * ((len(x) + batch - 1) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"teacher epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}")
    return model.eval()


def prepare(work: Path, *, pool: int = 6000, labels: int = 600, test: int = 2000, epochs: int = 6, seed: int = 0, log=print) -> dict:
    """digits32.npz and the teacher's state dict digits32_teacher.pt in `work` (reused when made with these settings)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    paths = {"data": work / "digits32.npz", "teacher": work / "digits32_teacher.pt", "info": work / "digits32_teacher.json",
             "arch": f"{Path(__file__).resolve()}:build_teacher"}
    settings = {"pool": pool, "labels": labels, "test": test, "epochs": epochs, "seed": seed}
    if paths["info"].exists() and json.loads(paths["info"].read_text()).get("settings") == settings:
        return {**paths, "teacher_info": json.loads(paths["info"].read_text())}
    d = write_npz(paths["data"], pool, labels, test, seed)
    t0 = time.perf_counter()
    model = train_teacher(d["x"], d["y_true"], epochs=epochs, seed=seed, log=log)
    info = {"settings": settings, "teacher_accuracy": accuracy(model, d["x_test"], d["y_test"]),
            "params": int(sum(p.numel() for p in model.parameters())), "seconds": round(time.perf_counter() - t0, 1)}
    torch.save(model.state_dict(), paths["teacher"])
    paths["info"].write_text(json.dumps(info, indent=2) + "\n")
    log(f"teacher: {info}")
    return {**paths, "teacher_info": info}


if __name__ == "__main__":
    import sys

    print(prepare(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/auto_bench")))
