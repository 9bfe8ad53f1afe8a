"""A folder of .npy arrays, memory-mapped: x.npy (float32 features, or integer token ids) and y.npy (int; -1 = unlabeled),
optionally x_test.npy and y_test.npy. For arrays too large to read whole (an .npz is read whole): only the rows a
batch asks for are read from disk."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import CompressError
from .dataset import Dataset, stratified_split
from .streaming import ArrayRows

CHECK_ROWS = 4096  # rows checked for NaN/Inf (or negative token ids) per array: a sample, the rest is read only when used


def is_npy_folder(path: Path) -> bool:
    return path.is_dir() and (path / "x.npy").is_file()


def _load(path: Path, name: str, kind: str):
    f = path / f"{name}.npy"
    if not f.is_file():
        raise CompressError(f"data folder {path} has x.npy but no {name}.npy", hint="save the labels as y.npy (-1 for unlabeled rows)")
    try:
        a = np.load(f, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise CompressError(f"{f} is not a readable .npy file ({type(exc).__name__}: {str(exc)[:120]})", hint="save it with numpy.save") from None
    if kind == "y":
        if a.dtype.kind not in "iu" or a.ndim != 1:
            raise CompressError(f"{f}: labels must be a 1-D integer array, got {a.dtype} of shape {a.shape}")
        return np.asarray(a, np.int64)  # labels are small: read whole
    if a.ndim < 2:
        raise CompressError(f"{f}: must be N×… with at least 2 dimensions, got shape {a.shape}")
    if a.dtype not in (np.float32, np.int64):
        raise CompressError(f"{f} has dtype {a.dtype}; a memory-mapped array is read as stored, so it must be float32 (features) or int64 (token ids)",
                            hint="save it with x.astype(np.float32) (or np.int64 for token ids)")
    head = np.asarray(a[:CHECK_ROWS])
    if a.dtype == np.float32 and not np.isfinite(head).all():
        raise CompressError(f"{f} has NaN or Inf values in its first rows", hint="clean or drop those rows")
    if a.dtype == np.int64 and (head < 0).any():
        raise CompressError(f"{f} holds negative token ids in its first rows", hint="token ids must be >= 0 (they index the embedding table)")
    return a


def load_npy_folder(path: Path, cfg: DataConfig) -> Dataset:
    x, y = _load(path, "x", "x"), _load(path, "y", "y")
    if len(y) != len(x):
        raise CompressError(f"data {path}: y.npy has {len(y)} rows but x.npy {len(x)}")
    if (path / "x_test.npy").is_file() or (path / "y_test.npy").is_file():
        xt, yt = _load(path, "x_test", "x"), _load(path, "y_test", "y")
        return Dataset(ArrayRows(x), y, ArrayRows(xt), yt, "x_test", str(path))
    keep, held = stratified_split(y, cfg.heldout_fraction, cfg.seed)
    if len(held) == 0:
        raise CompressError(f"data {path}: too few labeled rows to hold any out", hint="add x_test.npy/y_test.npy or more labeled rows")
    train = np.setdiff1d(np.arange(len(y)), held)
    rows = ArrayRows(x)
    return Dataset(rows.take(train), y[train], rows.take(held), y[held], "split", str(path))
