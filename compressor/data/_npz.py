"""`.npz` data: x (float features, N×…, or integer token ids, e.g. N×L), y (int, N; -1 = unlabeled), optional x_test / y_test."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import CompressError
from .dataset import Dataset, check_token_ids, stratified_split


def _array(npz, key: str, path: Path, kind: str) -> np.ndarray:
    try:
        a = npz[key]
    except Exception as exc:
        # numpy and zipfile raise many types on damaged files: ValueError, EOFError, BadZipFile, NotImplementedError
        # (unknown zip version), zlib.error (bad deflate data), tokenize.TokenError (mangled .npy header), MemoryError, ...
        raise CompressError(f"{path}: array '{key}' cannot be read ({type(exc).__name__}: {exc})", hint="the file may be truncated or corrupt") from None
    if kind == "x":
        if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
            raise CompressError(f"{path}: '{key}' must be a float array (features) or an integer array (token ids), got dtype {a.dtype}")
        if a.dtype.kind in "iu":  # token ids, e.g. (N, L) for a sequence model: kept as int64 (torch embeddings, ONNX Gather)
            check_token_ids(a, f"{path}: '{key}'")
            return np.ascontiguousarray(a, dtype=np.int64)
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes Inf, which validate() reports
            return np.ascontiguousarray(a, dtype=np.float32)
    if a.dtype.kind not in "iu":
        raise CompressError(f"{path}: '{key}' must be an integer array of class indices, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


def load_npz(path: Path, cfg: DataConfig):
    if path.stat().st_size == 0:
        raise CompressError(f"data {path} is empty")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # any parse failure of a damaged file (see _array)
        raise CompressError(f"data {path} is not a readable .npz file ({type(exc).__name__})", hint="save it with numpy.savez(path, x=..., y=...)") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise CompressError(f"data {path} is a single .npy array, not an .npz with 'x' and 'y'")
    with npz:
        keys = set(npz.files)
        if not {"x", "y"} <= keys:
            if any(k.endswith(("data.pkl", "constants.pkl", "archive_format")) for k in keys):
                raise CompressError(f"data {path} is a PyTorch model file, not data", hint="pass the model as --teacher and an .npz with 'x' and 'y' as --data")
            listed = ", ".join(sorted(keys)[:5]) + (", ..." if len(keys) > 5 else "")
            raise CompressError(f"data {path} needs arrays 'x' and 'y'; it has {listed or 'none'}")
        x, y = _array(npz, "x", path, "x"), _array(npz, "y", path, "y")
        if ("x_test" in keys) != ("y_test" in keys):
            raise CompressError(f"data {path}: give both 'x_test' and 'y_test' or neither")
        if "x_test" in keys:
            xt, yt = _array(npz, "x_test", path, "x"), _array(npz, "y_test", path, "y")
            return Dataset(x, y, xt, yt, "x_test", str(path))
    if len(y) != len(x) or y.ndim != 1:
        raise CompressError(f"data {path}: 'y' must have shape ({len(x)},), got {y.shape}")
    keep, held = stratified_split(y, cfg.heldout_fraction, cfg.seed)
    if len(held) == 0:
        raise CompressError(f"data {path}: too few labeled rows to hold any out", hint="add x_test/y_test or more labeled rows")
    train_mask = np.ones(len(y), bool)
    train_mask[held] = False
    return Dataset(x[train_mask], y[train_mask], x[held], y[held], "split", str(path))
