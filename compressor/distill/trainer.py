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


def _accuracy(module, x, y, device, batch_size=2048) -> float:
    import torch

    module.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            correct += int((module(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    module.train()
    return correct / max(1, len(x))


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


def _init_distributed(device: str) -> tuple[int, int, str]:
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
    import torch

    from . import augment as aug

    device = pick_device(cfg.device)
    rank, world, device = _init_distributed(device)
    loss_fn = get_loss(loss_name or cfg.loss)
    integer_input = not np.issubdtype(x.dtype, np.floating)
    preset = aug.resolve(cfg.augment, x.shape[1:], integer_input)
    mixing = (cfg.mixup > 0 or cfg.cutmix > 0) and not integer_input
    if (preset != "none" or mixing) and teacher_logits is not None and online_teacher is None:
        raise CompressError(f"{label}: augmentation needs the teacher online, not cached outputs", kind="runtime")
    module = module.to(device)
    if hint is not None:
        hint = hint.to(device)
    xt = torch.from_numpy(x).to(device)
    yt = torch.from_numpy(y).to(device)
    tt = torch.from_numpy(teacher_logits).to(device) if teacher_logits is not None else None
    xv, yv = torch.from_numpy(x_val).to(device), torch.from_numpy(y_val).to(device)

    raw = module  # the plain module: what is evaluated and saved
    params = list(module.parameters()) + (list(hint.parameters()) if hint is not None else [])
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        if device.startswith("cuda"):
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
            raw = module
        module = DistributedDataParallel(module, device_ids=[device] if device.startswith("cuda") else None)
        if hint is not None:
            hint.ddp(device)
    fwd = torch.compile(module) if cfg.compile and device.startswith("cuda") else module
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup_fraction * steps))

    def lr_at(s):  # linear warm-up, then cosine decay to zero
        return (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    on_gpu = device.startswith("cuda")
    use_amp = cfg.amp and on_gpu
    if cfg.amp_dtype not in ("bf16", "fp16"):
        raise CompressError(f"unknown mixed-precision type '{cfg.amp_dtype}'", hint="use bf16 or fp16")
    amp_dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
    if online_teacher is not None and use_amp:
        online_teacher.amp_dtype = amp_dtype
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    eval_every = max(1, steps // max(1, cfg.evals))

    step, best_acc, best_step, history, resumed_from = 0, -1.0, 0, [], 0
    best_state = {k: v.detach().clone() for k, v in raw.state_dict().items()}
    if resume and checkpoint.exists():
        try:
            ck = torch.load(checkpoint, map_location=device, weights_only=True)
            raw.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            scaler.load_state_dict(ck["scaler"])
            if hint is not None:
                hint.load_state_dict(ck["hint"])
            step, best_acc, best_step, history = ck["step"], ck["best_acc"], ck["best_step"], ck["history"]
            best_state = ck["best_model"]
            if ck.get("rng") is not None:  # dropout and other random layers continue their stream
                torch.set_rng_state(ck["rng"]["cpu"])
                if ck["rng"].get("cuda") is not None and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
            resumed_from = step
        except Exception as exc:
            raise CompressError(f"checkpoint {checkpoint} cannot be resumed: {str(exc).splitlines()[0][:200]}", hint="rerun with --force to start over") from None
        if ck.get("total_steps") != steps:
            raise CompressError(f"checkpoint {checkpoint} was made for {ck.get('total_steps')} steps, not {steps}", hint="rerun with the same settings, or --force to start over")

    ck_step = step if resume and checkpoint.exists() else None

    def save_checkpoint():
        nonlocal ck_step
        ck_step = step
        torch_save({"model": raw.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(), "step": step, "total_steps": steps, "best_acc": best_acc,
                    "best_step": best_step, "best_model": best_state, "history": history,
                    "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if on_gpu else None},
                    "hint": hint.state_dict() if hint is not None else None}, checkpoint)

    def stop_everywhere(requested: bool) -> bool:
        if world == 1:
            return requested
        import torch.distributed as dist

        flag = torch.tensor([int(requested)], device=device)
        dist.all_reduce(flag)  # every rank stops at the same step, or the others would wait forever
        return bool(flag.item())

    module.train()
    progress = _Progress(label, steps, step) if rank == 0 else None
    t0 = time.perf_counter()
    loss_value = float("nan")
    stop = _DeferredStop()  # Ctrl-C / SIGTERM take effect between steps, so the saved state is never half-updated
    try:
        while step < steps:
            gidx = _batch_indices(step, len(x), cfg.batch_size, cfg.seed)
            idx = torch.from_numpy(gidx).to(device)
            xb, yb = xt[idx], yt[idx]
            if preset != "none" or mixing:
                # the same seeded view on every rank and after a resume: the global batch is transformed whole
                gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, 7, step]).integers(2**62)))
                xb = aug.augment(xb, preset, gen)
                xb, mixed = aug.mix(xb, cfg.mixup, cfg.cutmix, np.random.default_rng([cfg.seed, 11, step])) if mixing else (xb, False)
                if mixed:
                    yb = torch.full_like(yb, -1)  # a blend has no label of its own: the teacher's answer is the target
            share = slice(rank, None, world)  # this rank's rows of the global batch
            xb, yb = xb[share], yb[share]
            if online_teacher is not None:
                tb = online_teacher(xb)
            else:
                tb = tt[idx][share] if tt is not None else None
            with torch.autocast("cuda", dtype=amp_dtype, enabled=use_amp):
                out = fwd(xb)
                loss = loss_fn(out.float(), tb, yb, cfg)
                if hint is not None:
                    loss = loss + cfg.hint_weight * hint.loss()
            if world > 1:  # DDP averages gradients over ranks: weight by share size so it equals the global mean
                loss = loss * (len(yb) * world / len(gidx))
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                kept = (f"the last good checkpoint (step {ck_step}) is kept at {checkpoint}" if ck_step is not None and checkpoint.exists()
                        else "no checkpoint had been written yet")
                raise CompressError(
                    f"{label}: the loss became {loss_value} at step {step}; training stopped and {kept}",
                    hint="lower --lr, or check the data for extreme values (scale it to about unit range)", kind="runtime")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad_norm:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            if step % eval_every == 0 or step == steps:
                acc = _accuracy(raw, xv, yv, device)
                module.train()
                history.append({"step": step, "loss": loss_value, "val_accuracy": acc})
                if acc >= best_acc:  # ties go to the later, longer-trained weights
                    best_acc, best_step = acc, step
                    best_state = {k: v.detach().clone() for k, v in raw.state_dict().items()}
                save_checkpoint()
                if progress:
                    progress.update(step, loss_value, acc)
                if on_eval is not None:  # e.g. the search's pruner; it may raise to stop this run
                    on_eval(step, acc)
            elif step % 20 == 0 and progress:
                progress.update(step, loss_value)
            if stop_everywhere(stop.requested):
                save_checkpoint()
                raise KeyboardInterrupt
    finally:
        stop.restore()
        if progress:
            progress.close()
    raw.load_state_dict(best_state)
    raw.eval()
    return raw.cpu(), TrainResult(best_acc, best_step, steps, time.perf_counter() - t0, history, resumed_from)
