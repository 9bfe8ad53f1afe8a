"""The teacher's pass over the training pool, shared by every distill flow (white box, search, QAT): either its
outputs for every pool row, computed once and cached in the run folder (memory-mapped by later runs and --resume),
or the teacher run online on every batch (function matching, mixing, hints)."""
from __future__ import annotations

import time

import numpy as np

from ..errors import CompressError
from ..log import say

POOL_CACHE = "cache/teacher_pool_logits.npy"


def teacher_online(dcfg) -> bool:
    """Function matching, mixing and hints need the teacher run on every batch (no cached outputs)."""
    return dcfg.augment != "none" or dcfg.mixup > 0 or dcfg.cutmix > 0 or bool(dcfg.hint)


def teacher_pool_logits(run, teacher, ds, dcfg) -> tuple[np.ndarray, float | None]:
    """The teacher's outputs for every pool row: from the run's cache when its key matches (seconds None), else
    computed and cached (seconds the pass took)."""
    from .._io import atomic_path, sha256_json, write_text
    from ..models.outputs import resolve_teacher_output
    from .trainer import pick_device

    cache = run.path(POOL_CACHE)
    # the outputs depend on the teacher, the data and how its outputs are read (--teacher-output) only: a rerun with
    # another loss, T or schedule reuses them
    key = sha256_json([run.manifest["inputs"], run.config.data.to_dict(), dcfg.teacher_output])
    key_file = cache.with_suffix(".key")
    if cache.exists() and key_file.exists() and key_file.read_text() == key:
        return np.load(cache, mmap_mode="r"), None
    resolve_teacher_output(teacher, ds.x, dcfg.teacher_output)  # done once per teacher (already, in the distill stage)
    say(f"distill: running the teacher ({teacher.format}) on {len(ds.x)} training rows")
    t0 = time.perf_counter()
    pool_logits = _shared_pass(teacher.to(pick_device(dcfg.device)), ds.x, 4 * dcfg.batch_size, dcfg.device)
    seconds = time.perf_counter() - t0
    teacher.to("cpu")
    bad = ~np.isfinite(pool_logits).all(axis=1)
    if bad.any():
        raise CompressError(f"the teacher returns NaN or Inf for {int(bad.sum())} of {len(bad)} training rows (first: row {int(np.argmax(bad))})",
                            hint="check the data's scale and preprocessing: it should match what the teacher was trained on")
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, pool_logits)
    write_text(key_file, key)
    return pool_logits, seconds


def _shared_pass(teacher, x, batch_size: int, device: str) -> np.ndarray:
    """The teacher over every row of x; under torchrun each rank runs (and reads) only rows rank, rank + world, … and
    the parts are gathered, so the pass takes 1/world of the time and no rank reads the whole pool."""
    from .ddp import in_torchrun

    if not in_torchrun():
        return logits_over(teacher, x, batch_size)
    import torch.distributed as dist

    from ..data.streaming import take
    from .trainer import init_distributed, pick_device

    rank, world, _ = init_distributed(pick_device(device))
    part = logits_over(teacher, take(x, np.arange(rank, len(x), world)), batch_size)
    parts = [None] * world
    dist.all_gather_object(parts, part)
    out = np.empty((len(x), parts[0].shape[1]), np.float32)
    for r, p in enumerate(parts):
        out[r::world] = p
    return out


def logits_over(teacher, x, batch_size: int) -> np.ndarray:
    """The teacher's outputs for every row of x; rows on disk are decoded a batch at a time in worker processes while the
    teacher runs, with a progress bar (tens of thousands of images take minutes)."""
    from ..data.streaming import is_lazy, iter_batches

    if not is_lazy(x):
        return teacher.logits(x, batch_size=batch_size)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..errors import rich_text

    outs = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True,
                  disable=not _interactive()) as bar:
        task = bar.add_task(rich_text("teacher pass"), total=len(x))
        for xb in iter_batches(x, batch_size):
            outs.append(teacher.logits(xb, batch_size=batch_size))
            bar.advance(task, len(xb))
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def heldout_classes(run, teacher, ds) -> np.ndarray:
    """The teacher's class for each held-out row, computed once per process (run.computed)."""
    if "teacher_heldout_classes" not in run.computed:
        run.computed["teacher_heldout_classes"] = logits_over(teacher.to("cpu"), ds.x_test, run.config.bench.eval_batch_size).argmax(1)
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
