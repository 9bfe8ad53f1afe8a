"""What every distill flow shares (white box in stage.py, black box in blackbox.py): the validation split carved from
the labeled training rows, the student factory, the preflight, the training of one job and its result record."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CompressError
from ..log import say


@dataclass
class Split:
    """The training rows and the validation split carved out of the labeled ones (never the held-out set)."""

    train_rows: np.ndarray
    val: np.ndarray
    labeled_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def validation_split(ds, dcfg) -> Split:
    from ..data import stratified_split

    labeled = np.flatnonzero(ds.y >= 0)
    _, val = stratified_split(ds.y, dcfg.val_fraction, dcfg.seed)
    if len(val) == 0:
        raise CompressError("too few labeled rows to carve out a validation split", hint="label more rows (each class needs at least 2 labeled rows)")
    train_rows = np.setdiff1d(np.arange(len(ds.y)), val)
    from ..data.streaming import take

    return Split(train_rows, val, np.intersect1d(train_rows, labeled), take(ds.x, val), ds.y[val])


def student_context(dcfg, ds, teacher) -> dict:
    """What building a student needs beyond the shapes: 'teacher:…' students are cut from the teacher; token ids size
    the embedding."""
    ctx = {}
    if dcfg.student and str(dcfg.student).startswith("teacher:"):
        ctx["teacher"] = teacher
    if getattr(ds, "token_ids", False):
        ctx["vocab_size"] = vocab_size(teacher, ds)
    return ctx


def student_factory(dcfg, ds, teacher, target: dict | None = None):
    """make(num_classes, fresh=False) -> (a fresh student module returning logits, its record): the same build for every
    job. --student auto here (a black-box teacher: no pruning, no candidates to score) is the data's built-in family
    sized to the budget; the white-box flow chooses among candidates instead (auto_student.choose)."""
    from ..models import build_student
    from ..models.outputs import logits_only

    teacher_params = teacher.num_params()
    ctx = student_context(dcfg, ds, teacher)
    if dcfg.student in ("auto", "teacher:pruned"):
        from .auto_student import family_only

        record = family_only(dcfg, ds, teacher, target, ctx)

        def make(num_classes: int, fresh: bool = False):
            from ..models import load_student

            rec = dict(record, kwargs=dict(record["kwargs"], num_classes=num_classes))
            return logits_only(load_student(rec), rec, ds.x[:2], dcfg.output)
        return make

    def make(num_classes: int, fresh: bool = False):
        return logits_only(*build_student(dcfg.student, ds.input_shape, num_classes, teacher_params, **ctx), ds.x[:2], dcfg.output)
    return make


def preflight(run, student, ds) -> dict | None:
    """Every check later stages make that an untrained student can fail, before any teacher pass or step (rank 0 only)."""
    from .._io import is_writer

    if not (run.config.preflight and is_writer()):
        return None
    from ..export.preflight import preflight as run_preflight

    info = run_preflight(student, ds.x[:8], run.target, run.config.export.opset, run.config.quantize.recipe)
    say(f"preflight: the student exports ({info['exporter']}, opset {info['opset']}), matches PyTorch and "
        f"quantizes ({info['recipe']}) in {info['seconds']:.1f} s")
    return info


def train_job(run, name: str, module, rows, tlogits, split: Split, jcfg, *, steps: int, loss: str, resume: bool,
              ckpt: str | None = None, **kw):
    """Train one job (the student, the baseline, a round's student) on the pool's rows; returns (module, TrainResult)."""
    from ..data.streaming import take
    from .trainer import train_student

    ds = run.data
    say(f"distill: training {name} ({loss}{', teacher online' if kw.get('online_teacher') else ''}) for {steps} steps on {len(rows)} rows")
    return train_student(module, take(ds.x, rows), ds.y[rows], tlogits, split.x_val, split.y_val, jcfg, steps=steps,
                         checkpoint=run.path("checkpoints") / (ckpt or f"{name}.ckpt"), label=name, resume=resume, loss_name=loss, **kw)


def save_trained(run, name: str, module, loss: str, res, rows, outputs: dict, results: dict) -> None:
    """Save a trained job's weights and its result record."""
    from .._io import torch_save

    torch_save(module.state_dict(), run.path(f"{name}.pt"))
    outputs[name] = f"{name}.pt"
    results[name] = {"loss": loss, "val_accuracy": res.best_val_accuracy, "best_step": res.best_step, "steps": res.steps,
                     "seconds": round(res.seconds, 2), "steps_per_second": round(res.steps / max(res.seconds, 1e-9), 2),
                     # the optimiser steps alone: without validation and checkpoints (what a plain training loop times)
                     "eval_seconds": round(res.eval_seconds, 2),
                     "train_steps_per_second": round((res.steps - res.resumed_from) / max(res.seconds - res.eval_seconds, 1e-9), 2),
                     "resumed_from_step": res.resumed_from, "train_rows": int(len(rows)), "history": res.history}


def summary(student, record, num_classes: int, split: Split, preflight_info, teacher, ds) -> dict:
    """The result fields every flow records."""
    from ..models.budget import count, teacher_macs

    x = np.zeros((2, *ds.input_shape), ds.x.dtype)  # a count needs shapes only: no row is decoded for it
    try:  # multiply-accumulates per row (torch.utils.flop_counter): the report shows them beside the parameters
        macs, t_macs = count(student, x)[1], teacher_macs(teacher, x)
    except CompressError:
        macs = t_macs = None
    return dict(student_record=record, num_classes=num_classes, val_rows=int(len(split.val)), preflight=preflight_info,
                params=int(sum(p.numel() for p in student.parameters())), teacher_params=teacher.num_params(),
                macs=macs, teacher_macs=t_macs, teacher_format=teacher.format, data=ds.summary())


def vocab_size(teacher, ds) -> int:
    """Embedding rows a token-id student needs: every id in the data, and the teacher's own vocabulary when it shows one."""
    size = int(max(ds.x.max(initial=0), ds.x_test.max(initial=0))) + 1
    module = teacher.module if teacher.format in ("state_dict", "pickle") else None
    if module is not None and hasattr(module, "modules"):
        import torch

        emb = next((m for m in module.modules() if isinstance(m, torch.nn.Embedding)), None)
        if emb is not None:
            size = max(size, int(emb.num_embeddings))
    return size


def check_student_output(student, x: np.ndarray, num_classes: int, spec) -> None:
    import torch

    try:
        with torch.no_grad():
            y = student.eval()(torch.from_numpy(x))
    except Exception as exc:
        raise CompressError(f"the student ({spec or 'default'}) cannot run on data of shape {x.shape[1:]}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (len(x), num_classes):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise CompressError(f"the student ({spec or 'default'}) returns {shape}; expected (batch, {num_classes}) class scores like the teacher")
