"""The training loop shared by distillation and the labels-only baseline: AdamW, warm-up + cosine,
gradient clipping, seeded batch order, validation-based best checkpoint, resumable checkpoints."""
from __future__ import annotations

import functools
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._io import torch_save
from ..config import DistillConfig
from ..errors import CompressError
from .losses import get_loss


@dataclass
class TrainResult:
    best_val_accuracy: float
    best_step: int
    steps: int
    seconds: float
    history: list[dict]
    resumed_from: int
    eval_seconds: float = 0.0  # of seconds, spent validating and writing checkpoints


# a streamed validation split up to this size is decoded once and kept; a larger one is decoded at each evaluation (in
# workers). 64 MB: 213 images at 224x224 as float16. Memory that grows with the labeled images until this cap.
VAL_IN_MEMORY_BYTES = 64 << 20


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CompressError("--device cuda was asked for but no CUDA GPU is available", hint="use --device cpu")
    if name not in ("cpu", "cuda"):
        raise CompressError(f"unknown device '{name}'", hint="use auto, cpu or cuda")
    return name


def budget_steps(cfg: DistillConfig, pool_rows: int) -> int:
    """Optimiser steps for a run: cfg.steps, or cfg.epochs passes over the pool but at least cfg.min_steps."""
    if cfg.steps is not None:
        return int(cfg.steps)
    return max(cfg.min_steps, math.ceil(cfg.epochs * pool_rows / cfg.batch_size))


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    # computed once per epoch, not per step: on a 40,000-row pool a fresh permutation costs as much as a tiny model's step
    return np.random.default_rng([seed, epoch]).permutation(n)


def _batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Rows for a given step: a seeded permutation per epoch, so a resumed run sees the same batches."""
    per_epoch = math.ceil(n / batch_size)
    epoch, pos = divmod(step, per_epoch)
    return _epoch_permutation(n, seed, epoch)[pos * batch_size:(pos + 1) * batch_size]


def eval_batch_size(x, batch_size: int) -> int:
    """Rows per batch of an inference pass over x while training at batch_size: 2048 small rows (numbers, token ids), but
    large rows (images) at the training batch size, and at most what LAZY_BATCH_BYTES of input holds. A model's
    activations, not its input, are what a batch of 224 px images costs: 256 of them through a small MobileNet hold
    about 1 GB at once, where the training batch is the size the user made fit."""
    from ..data.streaming import LAZY_BATCH_BYTES

    fits = LAZY_BATCH_BYTES // max(1, int(np.prod(x.shape[1:])) * 4)
    return 2048 if fits >= 2048 else max(1, min(batch_size, fits))


def _correct(module, x, y, device, batch_size=2048) -> int:
    """Rows of (x, y) the module classifies correctly: x tensors on the device, or rows on disk (LazyRows) decoded a
    batch at a time."""
    import torch

    from ..data.streaming import is_lazy, iter_batches

    module.eval()
    correct = 0
    with torch.inference_mode():
        if is_lazy(x):
            batches = (torch.from_numpy(xb).to(device) for xb in iter_batches(x, batch_size))
        else:
            batches = (x[i:i + batch_size].float() if x.dtype == torch.float16 else x[i:i + batch_size] for i in range(0, len(x), batch_size))
        for i, xb in zip(range(0, len(x), batch_size), batches):
            correct += int((module(xb).argmax(1) == y[i:i + batch_size]).sum())
    module.train()
    return correct


class _Progress:
    """A rich progress bar on a terminal; one log line per evaluation otherwise."""

    def __init__(self, label: str, total: int, start: int):
        self.tty = sys.stderr.isatty()
        self.label, self.total = label, total
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}  val acc {task.fields[val]}"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, completed=start, loss=float("nan"), val="-")

    def update(self, step: int, loss: float, val: float | None = None):
        if self.tty:
            fields = {"loss": loss}
            if val is not None:
                fields["val"] = f"{val:.4f}"
            self.bar.update(self.task, completed=step, **fields)
        elif val is not None:
            # through the logger, so --quiet silences it like every other progress line
            logging.getLogger("compressor").info(f"{self.label}: step {step}/{self.total} loss {loss:.4f} val acc {val:.4f}")

    def close(self):
        if self.tty:
            self.bar.stop()


class _DeferredStop:
    """Turn SIGINT/SIGTERM into a flag the training loop checks after each step (main thread only)."""

    def __init__(self):
        self.requested, self._old = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._request)

    def _request(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@dataclass
class OnlineTeacher:
    """The teacher run on each training batch (function matching, hint losses): a white-box module on the
    training device, or any object with .logits(numpy) (black boxes), in inference mode and mixed precision on GPU."""

    teacher: object
    device: str
    amp_dtype: object = None

    def __call__(self, xb):
        import torch

        t = self.teacher
        if getattr(t, "white_box", False):
            with torch.no_grad(), torch.autocast("cuda", dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
                y = t.module(xb)
            y = y[0] if isinstance(y, (tuple, list)) else y
            return t.as_logits(y.float()) if hasattr(t, "as_logits") else y.float()  # probabilities become their log
        return torch.from_numpy(t.logits(xb.detach().cpu().numpy())).to(xb.device)


def _dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) of a torchrun job; (0, 1, 0) otherwise."""
    import os

    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(device: str) -> tuple[int, int, str]:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA); returns (rank, world, device)."""
    import torch
    import torch.distributed as dist

    rank, world, local = _dist_info()
    if world == 1:
        return 0, 1, device
    if device == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def train_student(module, x: np.ndarray, y: np.ndarray, teacher_logits: np.ndarray | None,
                  x_val: np.ndarray, y_val: np.ndarray, cfg: DistillConfig, *, steps: int,
                  checkpoint: Path, label: str, resume: bool = False, loss_name: str | None = None,
                  online_teacher=None, hint=None, on_eval=None) -> tuple[object, TrainResult]:
    """Train module in place on (x, y[, teacher targets]); returns the best-on-validation module and a summary.

    Teacher targets come from the cached array teacher_logits (rows aligned with x) or, when online_teacher is
    given, from running it on each (augmented, mixed) batch. hint: an optional losses.hint.Hint adding a
    feature-matching term. Under torchrun each rank trains on its share of every global batch (DDP)."""
    import torch

    try:
        return _train(module, x, y, teacher_logits, x_val, y_val, cfg, steps=steps, checkpoint=checkpoint, label=label,
                      resume=resume, loss_name=loss_name, online_teacher=online_teacher, hint=hint, on_eval=on_eval)
    except torch.cuda.OutOfMemoryError:
        raise CompressError(f"{label}: out of GPU memory while training with batch size {cfg.batch_size}",
                            hint=f"lower --batch-size (e.g. --batch-size {max(1, cfg.batch_size // 2)}) or use --device cpu",
                            kind="runtime") from None


def _train(module, x, y, teacher_logits, x_val, y_val, cfg: DistillConfig, *, steps: int, checkpoint: Path, label: str,
           resume: bool, loss_name: str | None, online_teacher, hint, on_eval=None):
    trainer = _Trainer(module, x, y, teacher_logits, x_val, y_val, cfg, steps=steps, checkpoint=checkpoint, label=label,
                       loss_name=loss_name, online_teacher=online_teacher, hint=hint, on_eval=on_eval)
    if resume and checkpoint.exists():
        trainer.resume()
    trainer.ck_step = trainer.step if resume and checkpoint.exists() else None
    return trainer.run()


def _augmentation(cfg: DistillConfig, x, teacher_logits, online_teacher, label: str) -> tuple[str, bool]:
    """(the augmentation preset, whether batches are mixed (mixup/cutmix)); refused where the teacher's targets are cached."""
    from . import augment as aug

    integer_input = not np.issubdtype(x.dtype, np.floating)
    preset = aug.resolve(cfg.augment, x.shape[1:], integer_input)
    mixing = (cfg.mixup > 0 or cfg.cutmix > 0) and not integer_input
    if (preset != "none" or mixing) and teacher_logits is not None and online_teacher is None:
        raise CompressError(f"{label}: augmentation needs the teacher online, not cached outputs", kind="runtime")
    return preset, mixing


def _distributed(module, hint, device: str, world: int):
    """(the module to train, possibly DDP-wrapped; the plain module, what is evaluated and saved; the parameters to optimise)."""
    import torch

    raw = module
    params = list(module.parameters()) + (list(hint.parameters()) if hint is not None else [])
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        if device.startswith("cuda"):
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
            raw = module
        module = DistributedDataParallel(module, device_ids=[device] if device.startswith("cuda") else None)
        if hint is not None:
            hint.ddp(device)
    return module, raw, params


def _schedule(opt, cfg: DistillConfig, steps: int):
    """Linear warm-up over cfg.warmup_fraction of the steps, then cosine decay to zero."""
    import torch

    warm = max(1, int(cfg.warmup_fraction * steps))

    def lr_at(s):
        return (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def _mixed_precision(cfg: DistillConfig, on_gpu: bool) -> tuple[bool, object]:
    """(whether to train in mixed precision, its torch dtype)."""
    import torch

    if cfg.amp_dtype not in ("bf16", "fp16"):
        raise CompressError(f"unknown mixed-precision type '{cfg.amp_dtype}'", hint="use bf16 or fp16")
    return cfg.amp and on_gpu, torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16


class _Trainer:
    """One training run of train_student: the module (DDP-wrapped under torchrun), its optimiser, schedule and gradient
    scaler, the data on the device, and the progress made (step, best accuracy and weights, history) that checkpoints keep."""

    def __init__(self, module, x, y, teacher_logits, x_val, y_val, cfg: DistillConfig, *, steps: int, checkpoint: Path, label: str,
                 loss_name: str | None, online_teacher, hint, on_eval):
        import torch

        self.cfg, self.steps, self.checkpoint, self.label, self.on_eval = cfg, steps, checkpoint, label, on_eval
        self.rank, self.world, self.device = init_distributed(pick_device(cfg.device))
        device = self.device
        self.loss_fn = get_loss(loss_name or cfg.loss)
        self.preset, self.mixing = _augmentation(cfg, x, teacher_logits, online_teacher, label)
        module = module.to(device)
        self.hint = hint.to(device) if hint is not None else None
        from ..data.streaming import is_lazy

        self.rows = len(x)
        # rows on disk (an image folder) stay there: each step's batch is decoded ahead by DataLoader workers (_batch)
        self.lazy, self.stream = is_lazy(x), None
        self.xt = x if self.lazy else torch.from_numpy(x).to(device)
        self.yt = torch.from_numpy(y).to(device)
        # the teacher's cached outputs for pool rows on disk stay memory-mapped (an ArrayRows): read a batch at a time
        self.tt = (teacher_logits if is_lazy(teacher_logits) else torch.from_numpy(np.asarray(teacher_logits)).to(device)
                   if teacher_logits is not None else None)
        self.val_rows = len(y_val)
        if self.world > 1:  # each rank validates (and decodes) rows rank, rank + world, …; the counts are summed
            from ..data.streaming import take

            share = np.arange(self.rank, len(y_val), self.world)
            x_val, y_val = take(x_val, share), y_val[share]
        if is_lazy(x_val):  # decoded once, not at every evaluation, when it fits VAL_IN_MEMORY_BYTES
            from ..data.streaming import ArrayRows, iter_batches

            # decoded images (normalised pixels, small values) are kept as float16: half the memory, the same argmax but
            # for a rare near-tie; arrays on disk (features of any scale, token ids) as stored
            keep = np.float16 if not isinstance(x_val, ArrayRows) and x_val.dtype == np.float32 else x_val.dtype
            if x_val.size * np.dtype(keep).itemsize <= VAL_IN_MEMORY_BYTES:
                x_val = (np.concatenate([b.astype(keep) for b in iter_batches(x_val, 256)]) if len(x_val)
                         else np.zeros(x_val.shape, keep))
        self.xv = x_val if is_lazy(x_val) else torch.from_numpy(x_val).to(device)
        self.yv = torch.from_numpy(y_val).to(device)

        self.module, self.raw, self.params = _distributed(module, self.hint, device, self.world)
        self.fwd = torch.compile(self.module) if cfg.compile and device.startswith("cuda") else self.module
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = _schedule(self.opt, cfg, steps)
        self.on_gpu = device.startswith("cuda")
        self.use_amp, self.amp_dtype = _mixed_precision(cfg, self.on_gpu)
        self.online_teacher = online_teacher
        if online_teacher is not None and self.use_amp:
            online_teacher.amp_dtype = self.amp_dtype
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.eval_every = max(1, steps // max(1, cfg.evals))
        self.eval_seconds = 0.0
        self.eval_batch = eval_batch_size(x_val, cfg.batch_size)

        self.step, self.best_acc, self.best_step, self.history, self.resumed_from = 0, -1.0, 0, [], 0
        self.best_state = self._snapshot()
        self.ck_step = None  # the step of the last checkpoint written (or resumed from)

    def _snapshot(self) -> dict:
        return {k: v.detach().clone() for k, v in self.raw.state_dict().items()}

    # --- checkpoints ---------------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the checkpoint: weights, optimiser, schedule, scaler, progress and random streams."""
        import torch

        try:
            ck = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
            self._load(ck)
        except Exception as exc:
            raise CompressError(f"checkpoint {self.checkpoint} cannot be resumed: {str(exc).splitlines()[0][:200]}",
                                hint="rerun with --force to start over") from None
        if ck.get("total_steps") != self.steps:
            raise CompressError(f"checkpoint {self.checkpoint} was made for {ck.get('total_steps')} steps, not {self.steps}",
                                hint="rerun with the same settings, or --force to start over")

    def _load(self, ck: dict) -> None:
        import torch

        self.raw.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        if self.hint is not None:
            self.hint.load_state_dict(ck["hint"])
        self.step, self.best_acc, self.best_step, self.history = ck["step"], ck["best_acc"], ck["best_step"], ck["history"]
        self.best_state = ck["best_model"]
        if ck.get("rng") is not None:  # dropout and other random layers continue their stream
            torch.set_rng_state(ck["rng"]["cpu"])
            if ck["rng"].get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        self.resumed_from = self.step

    def save_checkpoint(self) -> None:
        import torch

        self.ck_step = self.step
        torch_save({"model": self.raw.state_dict(), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                    "scaler": self.scaler.state_dict(), "step": self.step, "total_steps": self.steps, "best_acc": self.best_acc,
                    "best_step": self.best_step, "best_model": self.best_state, "history": self.history,
                    "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if self.on_gpu else None},
                    "hint": self.hint.state_dict() if self.hint is not None else None}, self.checkpoint)

    # --- the loop ------------------------------------------------------------------------------------------------------
    def run(self):
        """Train from the current step to the last; returns (the best-on-validation module on the CPU, TrainResult)."""
        self.module.train()
        progress = _Progress(self.label, self.steps, self.step) if self.rank == 0 else None
        t0 = time.perf_counter()
        stop = _DeferredStop()  # Ctrl-C / SIGTERM take effect between steps, so the saved state is never half-updated
        try:
            while self.step < self.steps:
                loss_value = self._train_step()
                self.step += 1
                self._after_step(loss_value, progress)
                if self._stop_everywhere(stop.requested):
                    self.save_checkpoint()
                    raise KeyboardInterrupt
        finally:
            stop.restore()
            if progress:
                progress.close()
            if self.stream is not None:  # its decoding workers and their prefetched batches go now, not at garbage collection
                self.stream.close()
        self.raw.load_state_dict(self.best_state)
        self.raw.eval()
        return self.raw.cpu(), TrainResult(self.best_acc, self.best_step, self.steps, time.perf_counter() - t0, self.history, self.resumed_from,
                                           self.eval_seconds)

    def _train_step(self) -> float:
        """One optimiser step on this step's batch; returns the loss."""
        gidx, xb, yb, tb = self._batch()
        loss = self._loss(xb, yb, tb, len(gidx))
        loss_value = float(loss.detach())
        self._check_finite(loss_value)
        self._update(loss)
        return loss_value

    def _batch(self):
        """(the global batch's row indices, this rank's inputs, labels and teacher targets) for the current step."""
        import torch

        cfg = self.cfg
        gidx = _batch_indices(self.step, self.rows, cfg.batch_size, cfg.seed)
        idx = torch.from_numpy(gidx).to(self.device)
        share = slice(self.rank, None, self.world)  # this rank's rows of the global batch
        # mixing blends rows of the whole global batch, and so does augmentation of rows in memory (on the device);
        # rows on disk get their augmented views row by row where they are decoded (augment.RowViews), this rank's only
        whole = self.mixing or (self.preset != "none" and not self.lazy)
        if self.lazy:
            xb, yb = self._stream_rows(whole), self.yt[idx]
            if not whole:  # the stream decoded this rank's share only
                yb = yb[share]
        else:
            xb, yb = self.xt[idx], self.yt[idx]
        if whole:
            xb, yb = self._augment(xb, yb)
        if whole or not self.lazy:
            xb, yb = xb[share], yb[share]
        if self.online_teacher is not None:
            tb = self.online_teacher(xb)
        else:
            tb = self._teacher_rows(gidx, idx, share)
        return gidx, xb, yb, tb

    def _teacher_rows(self, gidx, idx, share):
        """This rank's cached teacher targets for the global batch gidx (idx on the device)."""
        import torch

        from ..data.streaming import is_lazy

        if self.tt is None:
            return None
        if is_lazy(self.tt):
            return torch.from_numpy(self.tt[gidx[share]]).to(self.device)
        return self.tt[idx][share]

    def _stream_rows(self, whole: bool):
        """This step's rows decoded ahead in worker processes: the whole global batch, or this rank's share of it."""
        import torch

        from ..data.streaming import BatchStream

        if self.stream is None:
            cfg, rank, world = self.cfg, self.rank, self.world

            def plan(step):
                g = _batch_indices(step, self.rows, cfg.batch_size, cfg.seed)
                places = np.arange(len(g))
                return (g, places) if whole else (g[rank::world], places[rank::world])
            views = None
            if not whole and self.preset != "none":
                from .augment import RowViews

                views = RowViews(self.preset, cfg.seed)
            self.stream = BatchStream(self.xt, plan, self.step, self.steps, views=views)
        return torch.from_numpy(self.stream.next_rows()).to(self.device)

    def _augment(self, xb, yb):
        """The global batch augmented and mixed: the same seeded view on every rank and after a resume."""
        import torch

        from . import augment as aug

        cfg, step = self.cfg, self.step
        gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, 7, step]).integers(2**62)))
        xb = aug.augment(xb, self.preset, gen)
        xb, mixed = aug.mix(xb, cfg.mixup, cfg.cutmix, np.random.default_rng([cfg.seed, 11, step])) if self.mixing else (xb, False)
        if mixed:
            yb = torch.full_like(yb, -1)  # a blend has no label of its own: the teacher's answer is the target
        return xb, yb

    def _loss(self, xb, yb, tb, global_rows: int):
        import torch

        with torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.use_amp):
            out = self.fwd(xb)
            loss = self.loss_fn(out.float(), tb, yb, self.cfg)
            if self.hint is not None:
                loss = loss + self.cfg.hint_weight * self.hint.loss()
        if self.world > 1:  # DDP averages gradients over ranks: weight by share size so it equals the global mean
            loss = loss * (len(yb) * self.world / global_rows)
        return loss

    def _check_finite(self, loss_value: float) -> None:
        if math.isfinite(loss_value):
            return
        kept = (f"the last good checkpoint (step {self.ck_step}) is kept at {self.checkpoint}"
                if self.ck_step is not None and self.checkpoint.exists() else "no checkpoint had been written yet")
        raise CompressError(
            f"{self.label}: the loss became {loss_value} at step {self.step}; training stopped and {kept}",
            hint="lower --lr, or check the data for extreme values (scale it to about unit range)", kind="runtime")

    def _update(self, loss) -> None:
        import torch

        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.clip_grad_norm:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()

    def _after_step(self, loss_value: float, progress) -> None:
        if self.step % self.eval_every == 0 or self.step == self.steps:
            self._evaluate(loss_value, progress)
        elif self.step % 20 == 0 and progress:
            progress.update(self.step, loss_value)

    def _val_accuracy(self) -> float:
        """Accuracy on the validation split: under torchrun each rank's share, the correct counts summed over ranks."""
        correct = _correct(self.raw, self.xv, self.yv, self.device, self.eval_batch)
        if self.world > 1:
            import torch
            import torch.distributed as dist

            t = torch.tensor([correct], dtype=torch.int64, device=self.device)
            dist.all_reduce(t)
            correct = int(t.item())
        return correct / max(1, self.val_rows)

    def _evaluate(self, loss_value: float, progress) -> None:
        """Validation accuracy; the best weights kept (ties go to the later, longer-trained ones); a checkpoint written."""
        t0 = time.perf_counter()
        acc = self._val_accuracy()
        self.module.train()
        self.history.append({"step": self.step, "loss": loss_value, "val_accuracy": acc})
        if acc >= self.best_acc:
            self.best_acc, self.best_step = acc, self.step
            self.best_state = self._snapshot()
        self.save_checkpoint()
        self.eval_seconds += time.perf_counter() - t0
        if progress:
            progress.update(self.step, loss_value, acc)
        if self.on_eval is not None:  # e.g. the search's pruner; it may raise to stop this run
            self.on_eval(self.step, acc)

    def _stop_everywhere(self, requested: bool) -> bool:
        if self.world == 1:
            return requested
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(requested)], device=self.device)
        dist.all_reduce(flag)  # every rank stops at the same step, or the others would wait forever
        return bool(flag.item())
