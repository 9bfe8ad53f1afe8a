"""Distillation from a teacher you can only query (a hosted model, a command, a Python callable, or any teacher
whose answers are limited to probabilities, a top-k or a label), optionally under a budget of rows sent to it.

Flow (`distill_blackbox`, called by api._distill in place of its own flow):
1. The query pool is every training row outside the validation split; for a label-only teacher only the
   unlabeled ones (a labeled row already has the answer such a teacher would give).
2. Without --query-budget the whole pool is asked once. With one, the budget is split into --query-rounds
   nearly equal rounds: round 1 asks a seeded random sample of the pool, stratified by label where rows have one;
   after each round a fresh student is trained on what is known so far and the next round asks the pool rows it is
   least sure of (margin: smallest top-1 minus top-2 probability; entropy: highest entropy).
3. The final student is trained, for the full step budget, on every labeled training row (its label is kept as a
   target) and every row the teacher answered (its answer converted by `to_targets`; losses in losses/blackbox.py).
Answers are cached in the run directory after every round (cache/teacher_queries.npz) under the distill
fingerprint, so a resumed or repeated run never pays for the same rows twice. Every row and call is recorded in
the stage result under "teacher_queries" and shown in the report.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ..errors import CompressError, did_you_mean
from ..models.outputs import PROB_FLOOR, check_probabilities, log_probs, output_kind, output_note

log = logging.getLogger("compressor")

OUTPUT_KINDS = ("auto", "logits", "probs", "topk:K", "label")
STRATEGIES = ("margin", "entropy")
LOSS_FOR = {"auto": "bbkd", "logits": "bbkd", "probs": "bbkd", "topk": "topk", "label": "pseudo"}
ROUND_STEPS_FRACTION = 0.5  # an intermediate round's student (used only to pick the next rows) trains for this share of the steps
LABEL_EXTRA_CLASSES = 1000  # a label teacher may name classes above the data's, up to max(2 x the data's classes, this)


def parse_teacher_output(value: str) -> tuple[str, int | None]:
    """'auto' | 'logits' | 'probs' | 'label' -> (kind, None); 'topk:K' -> ('topk', K). CompressError otherwise."""
    v = str(value).strip().lower()
    if v in ("auto", "logits", "probs", "label"):
        return v, None
    if v.startswith("topk"):
        _, sep, k = v.partition(":")
        if not sep or not k.strip().isdigit():
            raise CompressError(f"--teacher-output '{value}': K must be a whole number", hint="write topk:K, e.g. topk:5")
        if int(k) < 1:
            raise CompressError(f"--teacher-output '{value}': K must be at least 1", hint="write topk:K with K >= 1, e.g. topk:5")
        return "topk", int(k)
    raise CompressError(f"unknown --teacher-output '{value}'.{did_you_mean(v, ('auto', 'logits', 'probs', 'topk', 'label'))}",
                        hint="choose auto, logits, probs, topk:K (e.g. topk:5) or label")


def check_settings(dcfg) -> tuple[str, int | None]:
    """Validate the black-box settings of a DistillConfig; returns the parsed teacher output."""
    kind, k = parse_teacher_output(dcfg.teacher_output)
    if dcfg.query_strategy not in STRATEGIES:
        raise CompressError(f"unknown --query-strategy '{dcfg.query_strategy}'.{did_you_mean(str(dcfg.query_strategy), STRATEGIES)}",
                            hint="choose margin or entropy")
    if dcfg.query_budget is not None and (not isinstance(dcfg.query_budget, int) or dcfg.query_budget < 1):
        raise CompressError(f"--query-budget must be a positive number of rows, got {dcfg.query_budget!r}")
    if not isinstance(dcfg.query_rounds, int) or dcfg.query_rounds < 1:
        raise CompressError(f"--query-rounds must be at least 1, got {dcfg.query_rounds!r}")
    return kind, k


def _online_features(dcfg) -> list[str]:
    """Settings that need the teacher on every training batch, or a flow of their own."""
    bad = []
    if dcfg.augment != "none":
        bad.append(f"--augment {dcfg.augment}")
    if dcfg.mixup:
        bad.append("--mixup")
    if dcfg.cutmix:
        bad.append("--cutmix")
    if dcfg.hint:
        bad.append("--hint")
    if dcfg.search:
        bad.append("--search")
    if dcfg.nproc_per_node > 1:
        bad.append("--nproc-per-node")
    return bad


def wanted(dcfg, teacher_spec: str | None) -> bool:
    """Whether api._distill hands over to this flow: a budget, a top-k or label teacher output, or a callable/command
    teacher (so its calls are counted and cached) unless a feature that needs the teacher on every batch is on.
    Model files answering logits or probabilities (asked, or detected) stay in api's flow, where every loss, --search
    and function matching work: their probabilities become log-probabilities where the teacher's outputs are read."""
    from ..models._blackbox_teacher import is_query_spec

    if dcfg.query_budget or parse_teacher_output(dcfg.teacher_output)[0] in ("topk", "label"):
        return True
    return is_query_spec(teacher_spec) and not _online_features(dcfg)


# --- answers -> targets ------------------------------------------------------------------------------------------
def num_classes_from(answers: np.ndarray, data_classes: int, who: str = "the teacher") -> int:
    """Classes of the student: the width of score answers, else the data's labels and the class ids answered (ids
    beyond max(2 x the data's classes, LABEL_EXTRA_CLASSES) are refused: every class costs a column of every target row)."""
    if answers.ndim == 2:
        return int(answers.shape[1])
    top = int(answers.max(initial=-1))
    cap = max(2 * int(data_classes), LABEL_EXTRA_CLASSES)
    if top >= cap:
        raise CompressError(f"class id {top} (answered by {who}) is out of range: the data has {data_classes} classes, and a label "
                            f"teacher may add classes only up to id {cap - 1}",
                            hint="class ids must be 0..classes-1; check that the teacher and the data belong together")
    return max(int(data_classes), top + 1)


def to_targets(answers: np.ndarray, kind: str, k: int | None, num_classes: int, who: str = "the teacher") -> np.ndarray:
    """Turn raw answers ((N,) class ids or (N, C) scores) into the float32 (N, C) target array the losses read.

    logits: as they are. probs: log of the probabilities clipped at 1e-7 (renormalised; models/outputs.py). topk:K: the log of the
    teacher's distribution renormalised over each row's K largest scores (scores are read as probabilities when
    every one is in [0, 1] and rows sum to at most 1, else as logits), NaN for every other class. label: one-hot
    of the class id (or of the argmax of score rows)."""
    a = np.asarray(answers)
    n = len(a)
    if kind != "label" and a.ndim != 2:
        raise CompressError(f"{who} answers class ids (shape ({n},)), but --teacher-output is {kind}{':' + str(k) if k else ''}",
                            hint="pass --teacher-output label for a teacher that answers labels only")
    if kind == "auto":
        kind = output_kind(a, kind, who)["kind"]
    if a.ndim == 2 and a.shape[1] != num_classes:
        raise CompressError(f"{who} answered {a.shape[1]} scores per row, expected {num_classes} (its earlier answers, or the data's classes)",
                            hint="answer every row with one score per class, the same classes every time")
    if a.dtype.kind == "f" and np.isnan(a).any():
        raise CompressError(f"{who} answered NaN for {int(np.isnan(a).reshape(n, -1).any(1).sum())} of {n} rows")
    if kind == "label":
        ids = a.argmax(1) if a.ndim == 2 else a.astype(np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= num_classes):
            raise CompressError(f"{who} answered class {int(ids.max())}, but there are only {num_classes} classes (0..{num_classes - 1})",
                                hint="the first round's answers and the data's labels fix the classes; check the teacher and the data belong together")
        out = np.zeros((n, num_classes), np.float32)
        out[np.arange(n), ids] = 1.0
        return out
    a = a.astype(np.float32)
    if kind in ("logits", "probs") and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).any(1).sum())
        raise CompressError(f"{who} answered Inf for {bad} of {n} rows", hint="check the data's scale and preprocessing: it should match what the teacher expects")
    if kind == "logits":
        return a
    if kind == "probs":
        check_probabilities(a, who)
        return log_probs(a)
    # topk:K
    if k > num_classes:
        raise CompressError(f"--teacher-output topk:{k} asks for more classes than the teacher has ({num_classes})",
                            hint=f"use K <= {num_classes}, or --teacher-output probs")
    if np.isposinf(a).any():
        raise CompressError(f"{who} answered +Inf scores", hint="use -inf (or 0 for probabilities) for classes outside the top K")
    top = np.argsort(-a, axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(a, top, 1)
    if not np.isfinite(vals).all():
        raise CompressError(f"{who} gives fewer than {k} finite scores in {int((~np.isfinite(vals)).any(1).sum())} of {n} rows",
                            hint=f"answer at least the top {k} scores of every row, or lower K")
    finite = np.where(np.isfinite(a), a, 0.0)
    as_probs = bool((vals >= 0).all() and (vals <= 1).all() and (finite >= 0).all() and (finite.sum(1) <= 1 + 1e-3).all())
    logv = np.log(np.clip(vals, PROB_FLOOR, 1.0)) if as_probs else vals
    logv = logv - np.logaddexp.reduce(logv, axis=1, keepdims=True)  # renormalised over the top K
    out = np.full((n, num_classes), np.nan, np.float32)
    np.put_along_axis(out, top, logv.astype(np.float32), 1)
    return out


# --- selection -------------------------------------------------------------------------------------------------
def select_uncertain(logits: np.ndarray, n: int, strategy: str = "margin") -> np.ndarray:
    """Indices of the n rows the model is least sure of: smallest top-1 minus top-2 probability (margin) or highest
    entropy (entropy); ties keep row order."""
    if strategy not in STRATEGIES:
        raise CompressError(f"unknown --query-strategy '{strategy}'", hint="choose margin or entropy")
    z = np.asarray(logits, np.float64)
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    if strategy == "margin":
        s = np.sort(p, 1)
        score = s[:, -1] - s[:, -2] if p.shape[1] > 1 else np.ones(len(p))
    else:
        score = (p * np.log(np.clip(p, 1e-12, 1.0))).sum(1)  # minus the entropy: smallest first = most uncertain
    return np.argsort(score, kind="stable")[: max(0, int(n))]


def stratified_sample(rows: np.ndarray, y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded random sample of n of `rows`, stratified by label (unlabeled rows, y = -1, are one stratum)."""
    rows = np.asarray(rows)
    n = min(int(n), len(rows))
    if n <= 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, 1])
    strata, inv = np.unique(y[rows], return_inverse=True)
    counts = np.bincount(inv, minlength=len(strata))
    exact = n * counts / len(rows)
    alloc = np.floor(exact).astype(int)
    for s in np.argsort(-(exact - alloc), kind="stable")[: n - alloc.sum()]:  # largest remainders
        alloc[s] += 1
    picked = [rng.choice(rows[inv == s], size=alloc[s], replace=False) for s in range(len(strata)) if alloc[s]]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def round_sizes(budget: int, rounds: int) -> list[int]:
    rounds = max(1, min(rounds, budget))
    base, extra = divmod(budget, rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


# --- the flow --------------------------------------------------------------------------------------------------
def _load_cache(path, key: str) -> dict:
    if not path.exists():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return {}
            calls = z["calls"]
            return {r + 1: (z[f"rows_{r + 1}"], z[f"answers_{r + 1}"], int(calls[r])) for r in range(len(calls))}
    except Exception:  # a damaged cache is only a lost saving: ask again
        return {}


def _save_cache(path, key: str, cache: dict) -> None:
    from .._io import atomic_path

    arrays = {"key": np.array(key), "calls": np.array([cache[r][2] for r in sorted(cache)], np.int64)}
    for r, (rows, ans, _) in cache.items():
        arrays[f"rows_{r}"], arrays[f"answers_{r}"] = rows, ans
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def _scores(module, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    import torch

    module.eval()
    with torch.inference_mode():
        return np.concatenate([module(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size]))).float().numpy()
                               for i in range(0, len(x), batch_size)]) if len(x) else np.zeros((0, 1), np.float32)


def distill_blackbox(run, resume: bool) -> tuple[dict, dict]:
    """Train the student (and the baseline) from a teacher's answers under the run's black-box settings;
    returns (outputs, results) in the shape api._distill returns them, plus results['teacher_queries']."""
    import torch

    from .._io import torch_save
    from ..api import _check_student_output, _say
    from ..data import check_classes, stratified_split
    from ..models import build_student
    from ..models._blackbox_teacher import check_answer
    from .trainer import budget_steps, pick_device, train_student

    dcfg = run.config.distill
    kind, k = check_settings(dcfg)
    # the flow picks its loss from the teacher's output kind (bbkd/topk/pseudo); the default dist or kd both mean "that"
    bad = _online_features(dcfg) + ([f"--loss {dcfg.loss}"] if dcfg.loss not in ("kd", "dist") else [])
    if bad:
        raise CompressError(f"{', '.join(bad)} cannot be combined with a black-box teacher flow (--teacher-output {dcfg.teacher_output}"
                            f"{', --query-budget ' + str(dcfg.query_budget) if dcfg.query_budget else ''})",
                            hint="the teacher's answers are asked once per row and cached; drop those options")
    teacher, ds = run.teacher, run.data
    if dcfg.query_budget is not None and dcfg.query_budget < ds.num_classes:
        raise CompressError(f"--query-budget {dcfg.query_budget} is smaller than the number of classes ({ds.num_classes})",
                            hint=f"allow at least {ds.num_classes} rows (far more in practice: a few per class per round)")

    labeled = np.flatnonzero(ds.y >= 0)
    _, val = stratified_split(ds.y, dcfg.val_fraction, dcfg.seed)
    if len(val) == 0:
        raise CompressError("too few labeled rows to carve out a validation split", hint="label more rows (each class needs at least 2 labeled rows)")
    train_rows = np.setdiff1d(np.arange(len(ds.y)), val)
    labeled_train = np.intersect1d(train_rows, labeled)
    x_val, y_val = ds.x[val], ds.y[val]
    pool = train_rows[ds.y[train_rows] < 0] if kind == "label" else train_rows
    if len(pool) == 0:
        pool = train_rows  # every row is labeled: a label-only teacher can still smooth them
    budget = min(dcfg.query_budget or len(pool), len(pool))
    sizes = round_sizes(budget, dcfg.query_rounds if budget < len(pool) else 1)
    qbs = 4 * dcfg.batch_size  # rows per call, as for the white-box teachers' pool pass
    who = f"the teacher ({teacher.spec if hasattr(teacher, 'spec') else teacher.format})"
    loss = LOSS_FOR[kind]
    ckdir = run.path("checkpoints")
    teacher_params = teacher.num_params()
    from .. import api

    student_ctx = {}  # what build_student needs beyond the shapes ('teacher:…' students, token-id data), as in api._distill
    if dcfg.student and str(dcfg.student).startswith("teacher:"):
        student_ctx["teacher"] = teacher
    if getattr(ds, "token_ids", False) and hasattr(api, "_vocab_size"):
        student_ctx["vocab_size"] = api._vocab_size(teacher, ds)

    from ..models.outputs import logits_only

    def make_student(n_classes: int):
        return logits_only(*build_student(dcfg.student, ds.input_shape, n_classes, teacher_params, **student_ctx), ds.x[:2], dcfg.output)

    preflight = None
    from .._io import is_writer

    if run.config.preflight and is_writer():  # before the first query (a paid teacher's rows cost money): the data's classes stand in
        from ..export.preflight import preflight as run_preflight

        preflight = run_preflight(make_student(ds.num_classes)[0], ds.x[:8], run.target, run.config.export.opset, run.config.quantize.recipe)
        _say(f"preflight: the student exports ({preflight['exporter']}, opset {preflight['opset']}), matches PyTorch and "
             f"quantizes ({preflight['recipe']}) in {preflight['seconds']:.1f} s")

    cache_path = run.path("cache/teacher_queries.npz")
    key = run.fingerprint("distill")
    cache = _load_cache(cache_path, key)
    device = pick_device(dcfg.device)

    def ask(rows: np.ndarray) -> tuple[np.ndarray, int]:
        parts, calls = [], 0
        teacher.to(device)
        try:
            for i in range(0, len(rows), qbs):
                xb = ds.x[rows[i:i + qbs]]
                if hasattr(teacher, "answers"):
                    parts.append(teacher.answers(xb, batch_size=qbs))
                else:
                    parts.append(check_answer(teacher.logits(xb, batch_size=qbs), len(xb), who))
                calls += 1
        finally:
            teacher.to("cpu")
        if len({p.shape[1:] for p in parts}) > 1:
            raise CompressError(f"{who} answers batches in different shapes", hint="answer every batch with (N,) class ids or (N, classes) scores, always the same")
        return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), calls

    num_classes, output = None, None
    queried, targets = np.zeros(0, np.int64), None
    rounds, scorer, teacher_seconds = [], None, 0.0

    def training_set():
        rows = np.union1d(labeled_train, queried)
        t = np.full((len(rows), num_classes), np.nan, np.float32)
        t[np.searchsorted(rows, queried)] = targets
        return rows, t

    def train(name: str, rows, tlogits, loss_name: str, steps: int, ckpt: str):
        torch.manual_seed(dcfg.seed)
        module, _ = make_student(num_classes)
        _say(f"distill: training {name} ({loss_name}) for {steps} steps on {len(rows)} rows")
        return train_student(module, ds.x[rows], ds.y[rows], tlogits, x_val, y_val, dcfg, steps=steps,
                             checkpoint=ckdir / ckpt, label=name, resume=resume, loss_name=loss_name)

    for r, size in enumerate(sizes, start=1):
        entry = {"round": r}
        if r in cache:
            rows_r, ans_r, calls_r = cache[r]
            entry.update(selection=("all" if len(rows_r) >= len(pool) else "random") if r == 1 else dcfg.query_strategy, cached=True)
            _say(f"distill: round {r}/{len(sizes)}: {len(rows_r)} teacher answers from the run's cache")
        else:
            remaining = np.setdiff1d(pool, queried)
            if r == 1:
                rows_r = stratified_sample(remaining, ds.y, size, dcfg.seed) if size < len(remaining) else remaining
                how = "a stratified random sample" if size < len(remaining) else "every pool row"
                entry["selection"] = "random" if size < len(remaining) else "all"
            else:
                rows_r = remaining[np.sort(select_uncertain(_scores(scorer, ds.x[remaining]), size, dcfg.query_strategy))]
                how = f"the rows the student is least sure of ({dcfg.query_strategy})"
                entry["selection"] = dcfg.query_strategy
            _say(f"distill: round {r}/{len(sizes)}: asking {who} about {len(rows_r)} rows, {how}")
            t0 = time.perf_counter()
            ans_r, calls_r = ask(rows_r)
            teacher_seconds += time.perf_counter() - t0
            cache[r] = (rows_r, ans_r, calls_r)
            _save_cache(cache_path, key, cache)
            entry["cached"] = False
        if num_classes is None:
            num_classes = num_classes_from(ans_r, ds.num_classes, who)
            check_classes(ds, num_classes)
        if kind in ("auto", "logits", "probs") and ans_r.ndim == 2 and output is None:  # decided once, on the first answers
            output = output_kind(ans_r, kind, who)
            kind = output["kind"]
        t_r = to_targets(ans_r, kind, k, num_classes, who)
        queried = np.concatenate([queried, rows_r]).astype(np.int64)
        targets = t_r if targets is None else np.concatenate([targets, t_r])
        entry.update(rows=int(len(rows_r)), calls=int(calls_r))
        if r < len(sizes):  # a student to pick the next round's rows with
            rows, tl = training_set()
            steps_r = max(1, int(ROUND_STEPS_FRACTION * budget_steps(dcfg, len(rows))))
            scorer, res = train(f"round {r} student", rows, tl, loss, steps_r, f"student_round{r}.ckpt")
            entry.update(train_rows=int(len(rows)), steps=steps_r, val_accuracy=res.best_val_accuracy)
        rounds.append(entry)

    rows, tl = training_set()
    steps = budget_steps(dcfg, len(rows))
    torch.manual_seed(dcfg.seed)
    student, record = make_student(num_classes)
    _check_student_output(student, ds.x[:2], num_classes, dcfg.student)
    outputs, results = {}, {}
    jobs = [("student", loss, rows, tl)]
    if dcfg.baseline:
        jobs.append(("baseline", "labels", labeled_train, None))
    for name, loss_name, jrows, jt in jobs:
        module, res = train(name, jrows, jt, loss_name, steps, f"{name}.ckpt")
        torch_save(module.state_dict(), run.path(f"{name}.pt"))
        outputs[name] = f"{name}.pt"
        results[name] = {"loss": loss_name, "val_accuracy": res.best_val_accuracy, "best_step": res.best_step, "steps": res.steps,
                         "seconds": round(res.seconds, 2), "steps_per_second": round(res.steps / max(res.seconds, 1e-9), 2),
                         "resumed_from_step": res.resumed_from, "train_rows": int(len(jrows)), "history": res.history}
    total_rows, total_calls = sum(e["rows"] for e in rounds), sum(e["calls"] for e in rounds)
    results["teacher_queries"] = {
        "output": f"topk:{k}" if kind == "topk" else kind, "budget": dcfg.query_budget, "strategy": dcfg.query_strategy,
        "pool_rows": int(len(pool)), "rows": int(total_rows), "calls": int(total_calls),
        "rows_per_call": qbs, "loss": loss, "rounds": rounds,
    }
    results["teacher_pass_seconds"] = round(teacher_seconds, 2)
    results["teacher_online"] = False
    if output is not None:
        results["teacher_output"] = output
        note = output_note(output)
        results["notes"] = [note] if note else []
    results.update(student_record=record, num_classes=num_classes, val_rows=int(len(val)), preflight=preflight,
                   params=int(sum(p.numel() for p in student.parameters())), teacher_params=teacher_params,
                   teacher_format=teacher.format, data=ds.summary())
    _say(f"distill: the teacher answered {total_rows} rows in {total_calls} calls over {len(rounds)} round{'s' if len(rounds) != 1 else ''}")
    return outputs, results
