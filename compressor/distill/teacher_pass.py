"""The teacher's pass over the training pool, shared by every distill flow (white box, search, QAT): either its
outputs for every pool row, computed once and cached in the run folder (memory-mapped by later runs and --resume),
or the teacher run online on every batch (function matching, mixing, hints)."""
from __future__ import annotations

import math
import time

import numpy as np

from ..errors import CompressError
from ..log import say

POOL_CACHE = "cache/teacher_pool_logits.npy"


def teacher_online(dcfg) -> bool:
    """Function matching, mixing and hints need the teacher run on every batch (no cached outputs)."""
    return dcfg.augment != "none" or dcfg.mixup > 0 or dcfg.cutmix > 0 or bool(dcfg.hint)


def teacher_pool_logits(run, teacher, ds, dcfg):
    """The teacher's outputs for every pool row: from the run's cache when its key matches (seconds None), else
    computed and cached (seconds the pass took). For rows on disk (an image folder) the outputs are written to the cache
    batch by batch and come back memory-mapped, as an ArrayRows: memory does not grow with the pool."""
    from .._io import sha256_json, write_text
    from ..data.streaming import ArrayRows, is_lazy
    from ..models.outputs import resolve_teacher_output
    from .trainer import pick_device

    cache = run.path(POOL_CACHE)
    # the outputs depend on the teacher, the data and how its outputs are read (--teacher-output) only: a rerun with
    # another loss, T or schedule reuses them
    key = sha256_json([run.manifest["inputs"], run.config.data.to_dict(), dcfg.teacher_output])
    key_file = cache.with_suffix(".key")
    lazy = is_lazy(ds.x)

    def cached():
        return ArrayRows(np.load(cache, mmap_mode="r")) if lazy else np.load(cache, mmap_mode="r")
    if cache.exists() and key_file.exists() and key_file.read_text() == key:
        return cached(), None
    resolve_teacher_output(teacher, ds.x, dcfg.teacher_output)  # done once per teacher (already, in the distill stage)
    say(f"distill: running the teacher ({teacher.format}) on {len(ds.x)} training rows")
    t0 = time.perf_counter()
    # rows on disk go through the teacher at the training batch size (a model's activations at 224 px, not the input,
    # are what a batch costs); arrays in memory at 4x that
    _shared_pass(teacher.to(pick_device(dcfg.device)), ds.x, dcfg.batch_size if lazy else 4 * dcfg.batch_size, dcfg.device, cache)
    seconds = time.perf_counter() - t0
    teacher.to("cpu")
    from .._io import is_writer

    if is_writer():
        write_text(key_file, key)
    _barrier()
    return cached(), seconds


def _barrier() -> None:
    from .ddp import in_torchrun

    if in_torchrun():
        import torch.distributed as dist

        dist.barrier()


def _check_finite(out, n: int) -> None:
    """Refuse NaN/Inf outputs, read a chunk at a time."""
    bad_rows, first = 0, None
    for i in range(0, n, 65536):
        bad = ~np.isfinite(np.asarray(out[i:i + 65536])).all(axis=1)
        if bad.any():
            first = i + int(np.argmax(bad)) if first is None else first
            bad_rows += int(bad.sum())
    if bad_rows:
        raise CompressError(f"the teacher returns NaN or Inf for {bad_rows} of {n} training rows (first: row {first})",
                            hint="check the data's scale and preprocessing: it should match what the teacher was trained on")


def _shared_pass(teacher, x, batch_size: int, device: str, cache) -> None:
    """The teacher over every row of x, written batch by batch into the .npy at `cache` (atomically: a killed pass leaves
    no cache). Under torchrun each rank runs (and reads) only rows rank, rank + world, …; the parts are gathered a
    batch at a time and rank 0 writes them (the run folder is shared by the ranks), so the pass takes 1/world of the time,
    no rank reads the whole pool, and no rank holds all the outputs in memory."""
    from .._io import atomic_path, is_writer
    from ..data.streaming import batch_rows, take
    from .ddp import in_torchrun

    n = len(x)
    rank, world = 0, 1
    if in_torchrun():
        from .trainer import init_distributed, pick_device

        rank, world, _ = init_distributed(pick_device(device))
    mine = np.arange(rank, n, world)
    bs = batch_rows(x, batch_size)
    rounds = math.ceil(math.ceil(n / world) / bs)  # batches in the largest rank's share
    parts = _ranks_batches(teacher, take(x, mine), bs, rounds)
    with atomic_path(cache) as tmp:
        out = None
        for r_round, blocks in enumerate(_gathered(parts, world)):  # one list of (rank, logits) per round
            for r, block in blocks:
                if block is None or not len(block):
                    continue
                if out is None and is_writer():
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, block.shape[1]))
                rows = np.arange(r, n, world)[r_round * bs:r_round * bs + len(block)]
                if out is not None:
                    out[rows[0]:rows[-1] + 1:world] = block
        if is_writer():
            if out is None:  # no rows at all
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(0, 0))
            out.flush()
            _check_finite(out, n)
            del out


def _ranks_batches(teacher, x, bs: int, rounds: int):
    """This rank's outputs a batch at a time, then empty batches up to `rounds` (every rank takes part in each gather)."""
    k = 0
    for block in _logit_batches(teacher, x, bs):
        k += 1
        yield block
    for _ in range(k, rounds):
        yield None


def _gathered(parts, world: int):
    """For each round, [(rank, that rank's block)]: all ranks' blocks when under torchrun, else this process's."""
    if world == 1:
        for block in parts:
            yield [(0, block)]
        return
    import torch.distributed as dist

    for block in parts:
        got = [None] * world
        dist.all_gather_object(got, block)
        yield list(enumerate(got))


def _logit_batches(teacher, x, batch_size: int):
    """The teacher's outputs for x, a batch at a time; rows on disk are decoded in worker processes while the teacher
    runs, with a progress bar (tens of thousands of images take minutes)."""
    from ..data.streaming import is_lazy, iter_batches

    if not is_lazy(x):
        for i in range(0, len(x), batch_size):
            yield teacher.logits(x[i:i + batch_size], batch_size=batch_size)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..errors import rich_text

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True,
                  disable=not _interactive()) as bar:
        task = bar.add_task(rich_text("teacher pass"), total=len(x))
        for xb in iter_batches(x, batch_size):
            yield teacher.logits(xb, batch_size=batch_size)
            bar.advance(task, len(xb))


def logits_over(teacher, x, batch_size: int) -> np.ndarray:
    """The teacher's outputs for every row of x, in memory (the held-out set, calibration rows: not the pool)."""
    from ..data.streaming import is_lazy

    if not is_lazy(x):
        return teacher.logits(x, batch_size=batch_size)
    outs = list(_logit_batches(teacher, x, batch_size))
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def heldout_classes(run, teacher, ds) -> np.ndarray:
    """The teacher's class for each held-out row, computed once per process (run.computed)."""
    from ..data.streaming import is_lazy

    if "teacher_heldout_classes" not in run.computed:
        from .trainer import eval_batch_size

        # rows on disk go at the training batch size (their activations, not the input, are what a batch of images costs)
        bs = eval_batch_size(ds.x_test, run.config.distill.batch_size) if is_lazy(ds.x_test) else run.config.bench.eval_batch_size
        run.computed["teacher_heldout_classes"] = logits_over(teacher.to("cpu"), ds.x_test, bs).argmax(1)
    return run.computed["teacher_heldout_classes"]


def _interactive() -> bool:
    import sys

    return sys.stderr.isatty()


def online_teacher(teacher, student, sample: np.ndarray, dcfg) -> dict:
    """train_student's keyword arguments for a teacher run on every batch (and the hint, if asked)."""
    import torch

    from .trainer import OnlineTeacher, pick_device

    device = pick_device(dcfg.device)
    teacher.to(device)
    if teacher.white_box and hasattr(teacher.module, "eval"):
        teacher.module.eval()
    kw = {"online_teacher": OnlineTeacher(teacher, device)}
    if dcfg.hint:
        from .losses.hint import Hint

        kw["hint"] = Hint(dcfg.hint, student, teacher, torch.from_numpy(sample))
    return kw
