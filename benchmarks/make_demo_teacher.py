"""Re-create the built-in demo teacher: a TorchScript 1-D CNN trained on the 4,000 labeled rows of the
built-in mnist1d data (the rest of the pool stays unlabeled for distillation).

    python benchmarks/make_demo_teacher.py            # writes compressor/assets/demo_teacher.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import train_teacher  # noqa: E402

from compressor._io import atomic_path  # noqa: E402
from compressor.config import DataConfig  # noqa: E402
from compressor.data._mnist1d import generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "compressor" / "assets" / "demo_teacher.pt")
    ap.add_argument("--epochs", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = DataConfig()
    d = generate(cfg.mnist1d_samples)
    x, y = d["x"][: cfg.mnist1d_labels], d["y"][: cfg.mnist1d_labels]
    model = train_teacher(x, y, epochs=args.epochs)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(d["x_test"])).argmax(1).numpy() == d["y_test"]).mean())
    scripted = torch.jit.script(model)
    with atomic_path(args.out) as tmp:
        torch.jit.save(scripted, str(tmp))
    params = sum(p.numel() for p in model.parameters())
    print(f"demo teacher: {params} parameters, held-out accuracy {acc:.4f}, {args.out.stat().st_size} bytes -> {args.out}")


if __name__ == "__main__":
    main()
