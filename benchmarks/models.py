"""Model definitions used by the benchmark suite and the demo teacher (importable as a student factory:
`--student benchmarks/models.py:student`)."""
from __future__ import annotations

import torch
import torch.nn as nn


class SignalCNN(nn.Module):
    """A 1-D CNN for mnist1d-like signals (N, L); input normalisation is part of the model."""

    def __init__(self, length: int = 40, num_classes: int = 10, width: int = 64, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

        def block(i, o, s):
            return [nn.Conv1d(i, o, 3 if i != 1 else 5, stride=s, padding=1 if i != 1 else 2), nn.BatchNorm1d(o), nn.ReLU()]

        self.features = nn.Sequential(*block(1, width, 1), *block(width, width, 2), *block(width, width, 2), *block(width, width, 1))
        self.head = nn.Linear(width * ((length + 3) // 4), num_classes)

    def forward(self, x):
        x = ((x - self.mean) / self.std).unsqueeze(1)
        return self.head(self.features(x).flatten(1))


class SmallSignalCNN(nn.Module):
    """The benchmark's fixed student: about a tenth of SignalCNN's parameters."""

    def __init__(self, length: int = 40, num_classes: int = 10, width: int = 20):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, width, 5, padding=2, stride=2), nn.ReLU(),
            nn.Conv1d(width, width, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv1d(width, width, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(width * ((length + 3) // 4), num_classes)

    def forward(self, x):
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


def student() -> nn.Module:
    return SmallSignalCNN()


def fit(model: nn.Module, x, y, *, epochs: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0, pct_start: float = 0.05) -> nn.Module:
    """Train a classifier on labeled rows with AdamW + one-cycle and a seeded batch order; returns it in eval mode."""
    import numpy as np

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    per_epoch = (len(x) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * per_epoch, pct_start=pct_start)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(len(x)))
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a single row
                sched.step()
                continue
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def train_teacher(x, y, *, epochs: int = 60, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """Train SignalCNN on labeled rows (x float32 N×L, y int64); deterministic for a seed."""
    torch.manual_seed(seed)
    model = SignalCNN(x.shape[1], int(y.max()) + 1, mean=float(x.mean()), std=float(x.std()))
    return fit(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)


class _ResBlock(nn.Module):
    """Two 3×3 conv + BatchNorm layers with a skip connection (a 1×1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


class ImageResNet(nn.Module):
    """A small ResNet for (N, C, H, W) images in [0, 1]: stem conv, three residual blocks, global average pool, linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 24):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(_ResBlock(width, width), _ResBlock(width, 2 * width, 2), _ResBlock(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


def train_image_teacher(x, y, *, epochs: int = 15, batch_size: int = 64, lr: float = 3e-3, seed: int = 0, width: int = 24) -> nn.Module:
    """Train ImageResNet on labeled images (x float32 N×C×H×W, y int64); deterministic for a seed."""
    torch.manual_seed(seed)
    model = ImageResNet(x.shape[1], int(y.max()) + 1, width)
    return fit(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, pct_start=0.1)
