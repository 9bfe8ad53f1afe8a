"""The Dataset every data source gives, and what checks, splits and validates it (what the loaders in _folder,
_mnist1d and _npz need; compressor.data re-exports all of it)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CompressError


@dataclass
class Dataset:
    """A training pool (y = -1 marks unlabeled rows) and a held-out set, both validated."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    heldout_source: str  # x_test | split | folder
    name: str
    class_names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return int(max(self.y.max(initial=-1), self.y_test.max(initial=-1))) + 1

    @property
    def token_ids(self) -> bool:
        """True when x holds integer token ids (int64) rather than float features."""
        return is_token_ids(self.x)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def summary(self) -> dict:
        labeled = int((self.y >= 0).sum())
        return {
            "name": self.name,
            "train_labeled": labeled,
            "train_unlabeled": int(len(self.y) - labeled),
            "heldout": int(len(self.y_test)),
            "heldout_source": self.heldout_source,
        }


def is_token_ids(x: np.ndarray) -> bool:
    """Integer inputs are token ids (fed to an embedding as int64); float inputs are features."""
    return x.dtype.kind in "iu"


def check_token_ids(x: np.ndarray, what: str) -> None:
    """Token ids index an embedding table: they must be >= 0 (and fit int64)."""
    if x.size == 0:
        return
    low, high = x.min(), x.max()
    if low < 0:
        bad = int((x < 0).reshape(len(x), -1).any(1).sum()) if x.ndim else 1
        raise CompressError(f"{what} has integer dtype {x.dtype}, read as token ids, but {bad} rows hold negative ids (min {int(low)})",
                            hint="token ids must be >= 0 (they index the embedding table); if the array holds feature values, "
                                 "not token ids, convert it to float32 in the scale the teacher expects")
    if x.dtype == np.uint64 and high > np.iinfo(np.int64).max:
        raise CompressError(f"{what} has token ids above 2**63-1 (max {int(high)})", hint="token ids index an embedding table: renumber the vocabulary from 0")


def validate(ds: Dataset) -> Dataset:
    """Check shapes, dtypes, finiteness (floats) or non-negative ids (integer token ids) and labels; raise CompressError naming the first problem."""
    for xname, yname in (("x", "y"), ("x_test", "y_test")):
        x, y = getattr(ds, xname), getattr(ds, yname)
        if x.ndim < 2:
            raise CompressError(f"{ds.name}: '{xname}' must be N×… with at least 2 dimensions, got shape {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise CompressError(f"{ds.name}: '{yname}' must have shape ({len(x)},) to match '{xname}', got {y.shape}")
        if getattr(x, "lazy", False):  # decoded on demand: pixels scaled to [0, 1] and normalised are finite by construction
            continue
        if is_token_ids(x):
            check_token_ids(x, f"{ds.name}: '{xname}'")
        elif not np.all(np.isfinite(x)):  # NaN/Inf exist only in floats
            bad = int((~np.isfinite(x)).reshape(len(x), -1).any(1).sum())
            raise CompressError(f"{ds.name}: '{xname}' has NaN or Inf values in {bad} rows", hint="clean or drop those rows")
    if is_token_ids(ds.x) != is_token_ids(ds.x_test):
        kinds = {True: "integer token ids", False: "float features"}
        raise CompressError(f"{ds.name}: 'x' holds {kinds[is_token_ids(ds.x)]} ({ds.x.dtype}) but 'x_test' holds {kinds[is_token_ids(ds.x_test)]} ({ds.x_test.dtype})",
                            hint="save both with the same kind of dtype")
    if ds.x.shape[1:] != ds.x_test.shape[1:]:
        raise CompressError(f"{ds.name}: held-out rows have shape {ds.x_test.shape[1:]} but training rows {ds.x.shape[1:]}")
    if (ds.y < -1).any():
        raise CompressError(f"{ds.name}: labels below -1 found (min {int(ds.y.min())}); use -1 for unlabeled rows only")
    if (ds.y_test < 0).any():
        raise CompressError(f"{ds.name}: every held-out row needs a label (found labels < 0 in y_test)")
    if not (ds.y >= 0).any():
        raise CompressError(f"{ds.name}: no labeled rows in the training data", hint="label some rows (y >= 0) or add x_test/y_test")
    if len(ds.y_test) == 0:
        raise CompressError(f"{ds.name}: the held-out set is empty")
    return ds


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held) of labeled rows, `fraction` of each class held out, seeded."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(y[y >= 0]):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n = int(round(len(idx) * fraction))
        if len(idx) > 1:
            n = min(max(n, 1), len(idx) - 1)
        else:
            n = 0
        held.append(idx[:n])
        keep.append(idx[n:])
    if not keep:  # no labeled rows at all
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def check_classes(ds: Dataset, num_classes: int, who: str = "the teacher") -> None:
    """Raise when the labels name classes the model does not have."""
    top = int(max(ds.y.max(initial=-1), ds.y_test.max(initial=-1)))
    if top >= num_classes:
        raise CompressError(
            f"labels go up to {top} but {who} has {num_classes} classes",
            hint="labels must be in 0..classes-1 (or -1 for unlabeled); check the teacher and the data belong together",
        )
    if ds.class_names is not None and len(ds.class_names) != num_classes:
        raise CompressError(f"the image folder has {len(ds.class_names)} classes but {who} has {num_classes}")
