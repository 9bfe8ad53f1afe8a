"""The built-in data: mnist1d, generated offline (its get_dataset() would download)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .._io import atomic_path, ensure_dir
from ..errors import CompressError
from ..config import DataConfig
from .dataset import Dataset


def generate(samples: int, seed: int = 42) -> dict:
    """mnist1d arrays as float32/int64: x (pool), y, x_test, y_test."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = samples
    args.seed = seed
    d = make_dataset(args)
    return {
        "x": d["x"].astype(np.float32), "y": d["y"].astype(np.int64),
        "x_test": d["x_test"].astype(np.float32), "y_test": d["y_test"].astype(np.int64),
    }


def user_cache_dir() -> Path:
    """Where generated data is kept between runs ($COMPRESSOR_CACHE, else $XDG_CACHE_HOME/compressor)."""
    if os.environ.get("COMPRESSOR_CACHE"):
        return Path(os.environ["COMPRESSOR_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "compressor"


def load_mnist1d(cfg: DataConfig, cache_dir: Path | None):
    # The data is a pure function of its size, so one copy in the user's cache serves every run.
    try:
        cache_dir = ensure_dir(user_cache_dir())
    except CompressError:
        pass  # an unwritable home: keep the copy in the run directory instead
    cache = cache_dir / f"mnist1d-{cfg.mnist1d_samples}.npz" if cache_dir else None
    d = None
    if cache is not None and cache.exists():
        try:
            with np.load(cache) as z:
                d = {k: z[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception:
            d = None  # a damaged cache is regenerated, never trusted
    if d is None:
        d = generate(cfg.mnist1d_samples)
        if cache is not None:
            with atomic_path(cache) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **d)
    y = d["y"].copy()
    y[cfg.mnist1d_labels:] = -1  # the first rows are labeled, the rest form the unlabeled pool
    return Dataset(d["x"], y, d["x_test"], d["y_test"], "x_test", "mnist1d")
