"""Rows that live on disk and are decoded when read: an image folder is a list of paths, never a float array of the whole
set in memory. `LazyRows` behaves like the (N, ...) float32 array it stands for where the pipeline indexes it (an int, a
slice or an index array gives decoded rows; `take` gives a lazy subset), and `iter_batches`/`BatchStream` decode
batches in DataLoader worker processes, so memory does not grow with the number of rows and decoding runs on every core."""
from __future__ import annotations

import os
from typing import Iterable, Iterator

import numpy as np

from ..errors import CompressError


ARRAY_MAX_BYTES = 2 << 30  # np.asarray(rows) decodes everything at once only below this
# a pass over rows on disk (the teacher's, an accuracy pass) takes at most this many bytes of input per batch: at 224x224
# RGB float32 that is 55 images, where a batch size made for small rows (1024) would hold 616 MB of pixels at once,
# plus a model's activations for all of them
LAZY_BATCH_BYTES = 32 << 20
PREFETCH = 2  # batches each worker decodes ahead (DataLoader's default)


def default_workers() -> int:
    """DataLoader workers when --workers is not given: the cores this process may use, at most 8 (0 on one core)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return 0 if cores <= 1 else min(8, cores)


class LazyRows:
    """N rows of shape `row_shape`, made by `decode(i)` for i in `index` (positions in the source's list of files)."""

    lazy = True
    dtype = np.dtype(np.float32)

    def __init__(self, decode, n_source: int, row_shape: tuple[int, ...], index: np.ndarray | None = None, workers: int | None = None):
        self.decode, self.n_source, self.row_shape = decode, n_source, tuple(row_shape)
        self.index = np.arange(n_source, dtype=np.int64) if index is None else np.asarray(index, np.int64)
        self.workers = default_workers() if workers is None else int(workers)

    # --- the array it stands for ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __getitem__(self, key) -> np.ndarray:
        """Decoded rows: x[i] is one row, x[a:b] and x[[i, j]] are (n, ...) arrays, as numpy indexing gives them."""
        if isinstance(key, tuple):  # x[rows, ...]: decode the rows, then index the rest
            if isinstance(key[0], (int, np.integer)):
                return self[key[0]][key[1:]]
            return self[key[0]][(slice(None), *key[1:])]
        if isinstance(key, (int, np.integer)):
            return self._one(int(self.index[key]))
        return self._many(self.index[key])

    def _one(self, i: int) -> np.ndarray:
        """Row i of the source."""
        return self.decode(i)

    def _many(self, rows: np.ndarray) -> np.ndarray:
        """Rows of the source, stacked."""
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        for n, i in enumerate(rows):
            out[n] = self.decode(int(i))
        return out

    def __array__(self, dtype=None, copy=None):
        """Every row decoded into one array: for small sets (tests, a quick look). The pipeline never asks for this; a set
        too large to hold in memory is refused rather than swapped to death."""
        nbytes = self.size * self.dtype.itemsize
        if nbytes > ARRAY_MAX_BYTES:
            raise MemoryError(f"LazyRows: {len(self)} rows would need {nbytes / 2**30:.1f} GiB as one array; index slices or use iter_batches")
        out = self[:]
        return out.astype(dtype) if dtype is not None else out

    def min(self, initial=None):
        """The smallest value, read a chunk at a time (numpy's initial= for an empty set)."""
        return min((b.min() for b in iter_batches(self, 256) if b.size), default=initial if initial is not None else 0)

    def max(self, initial=None):
        return max((b.max() for b in iter_batches(self, 256) if b.size), default=initial if initial is not None else 0)

    def take(self, rows) -> "LazyRows":
        """The rows at these positions, still undecoded."""
        return LazyRows(self.decode, self.n_source, self.row_shape, self.index[np.asarray(rows)], self.workers)

    def __repr__(self) -> str:
        return f"LazyRows({len(self)} rows of {self.row_shape}, {self.workers} workers)"


def is_lazy(x) -> bool:
    return getattr(x, "lazy", False) is True


def take(x, rows):
    """x[rows] without decoding anything when x is lazy (a view on the same files), else numpy's fancy indexing."""
    return x.take(rows) if is_lazy(x) else x[rows]


# --- decoding in DataLoader workers ---------------------------------------------------------------------------------------
class _Failed:
    """A row a worker could not decode: the error crosses back to the main process as data, so it stays one clean line."""

    def __init__(self, exc: CompressError):
        self.message, self.hint, self.kind = exc.message, exc.hint, exc.kind


class _Rows:
    """A map-style torch Dataset over a LazyRows: item i is row i decoded (or the reason it could not be); item
    (i, step, pos) is row i decoded and then passed through views(row, step, pos) (function matching's view of it)."""

    def __init__(self, x: LazyRows, views=None):
        self.x, self.views = x, views

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key):
        try:
            if isinstance(key, tuple):
                i, step, pos = key
                return self.views(self.x[int(i)], step, pos)
            return self.x[int(key)]
        except CompressError as exc:
            return _Failed(exc)


def _collate(rows: list):
    for r in rows:
        if isinstance(r, _Failed):
            return r
    return np.stack(rows) if rows else None


def _check(batch):
    if isinstance(batch, _Failed):
        raise CompressError(batch.message, hint=batch.hint, kind=batch.kind)
    return batch


def _loader(x: LazyRows, batches: Iterable, workers: int, views=None):
    import torch.utils.data as tud

    kw = {"num_workers": workers, "collate_fn": _collate, "batch_sampler": batches}
    if workers > 0:
        kw.update(prefetch_factor=PREFETCH, persistent_workers=False)
    return tud.DataLoader(_Rows(x, views), **kw)


def batch_rows(x, batch_size: int) -> int:
    """The rows a pass over x takes at once: batch_size, and for rows on disk at most LAZY_BATCH_BYTES of them (bounded
    memory whatever the rows' size)."""
    if not is_lazy(x):
        return max(1, batch_size)
    row_bytes = max(1, int(np.prod(x.row_shape)) * x.dtype.itemsize)
    return max(1, min(batch_size, LAZY_BATCH_BYTES // row_bytes))


def iter_batches(x, batch_size: int, workers: int | None = None) -> Iterator[np.ndarray]:
    """x in order, batch_size rows at a time: decoded in worker processes when x is lazy, numpy slices otherwise."""
    if not is_lazy(x):
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size]
        return
    w = x.workers if workers is None else workers
    batch_size = batch_rows(x, batch_size)
    batches = [range(i, min(i + batch_size, len(x))) for i in range(0, len(x), batch_size)]
    if w == 0 or len(batches) <= 1:
        for b in batches:
            yield x[b.start:b.stop]
        return
    for batch in _loader(x, batches, min(w, len(batches))):
        yield _check(batch)


class BatchStream:
    """The training loop's batches, decoded ahead in worker processes: `next_rows()` gives the rows the loop asks for at
    each step, in the order of `plan` (a callable step -> (index array, their places in the global batch), known in
    advance), from `start` to `stop`; with `views`, each row is decoded and then made into views(row, step, place)
    in the worker (function matching's augmented view)."""

    def __init__(self, x: LazyRows, plan, start: int, stop: int, workers: int | None = None, views=None):
        self.x, self.plan, self.start, self.stop, self.views = x, plan, start, stop, views
        self.workers = x.workers if workers is None else workers
        self._it = None

    def _batches(self):
        for step in range(self.start, self.stop):
            rows, places = self.plan(step)
            if self.views is None:
                yield [int(i) for i in rows]
            else:
                yield [(int(i), step, int(p)) for i, p in zip(rows, places)]

    def next_rows(self) -> np.ndarray:
        if self._it is None:
            if self.workers == 0 and self.views is None:
                self._it = (self.x[np.asarray(b, np.int64)] for b in self._batches())
            elif self.workers == 0:
                rows = _Rows(self.x, self.views)
                self._it = (_collate([rows[k] for k in b]) for b in self._batches())
            else:
                self._it = iter(_loader(self.x, self._batches(), self.workers, self.views))
        return _check(next(self._it))

    def close(self) -> None:
        self._it = None


class ArrayRows(LazyRows):
    """Rows of an array on disk (a memory-mapped .npy): indexing reads just those rows from the file, in this process
    (a memory map needs no decoding workers); `take` is a view that reads nothing."""

    def __init__(self, array, index: np.ndarray | None = None):
        super().__init__(None, len(array), array.shape[1:], index, workers=0)
        self.array, self.dtype = array, array.dtype

    def _one(self, i: int) -> np.ndarray:
        return np.array(self.array[i])  # a copy: writable, and no longer tied to the map

    def _many(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():  # contiguous: one slice
            return np.array(self.array[rows[0]:rows[-1] + 1])
        return np.array(self.array[rows])

    def take(self, rows) -> "ArrayRows":
        return ArrayRows(self.array, self.index[np.asarray(rows)])

    def __repr__(self) -> str:
        return f"ArrayRows({len(self)} rows of {self.row_shape} {self.dtype})"
