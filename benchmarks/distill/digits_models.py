"""The digits case's teacher: a small CNN for scikit-learn's 8×8 digits (N, 1, 8, 8), about 94k parameters.
Usable as --teacher-arch benchmarks/distill/digits_models.py:build_teacher with the saved state dict."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(i, o, s):
            return [nn.Conv2d(i, o, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.features = nn.Sequential(*block(1, 32, 1), *block(32, 64, 2), *block(64, 128, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def build_teacher() -> nn.Module:
    return DigitsCNN()


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 60, seed: int = 0) -> nn.Module:
    """AdamW + one-cycle on labeled rows with small random shifts; deterministic for a seed."""
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps_per_epoch = (len(x) + 63) // 64
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            xb = xt[idx]
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, (dy, dx), (2, 3))
            loss = nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()
