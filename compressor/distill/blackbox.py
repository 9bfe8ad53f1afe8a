"""Distillation from a teacher you can only query (a hosted model, a command, a Python callable, or any teacher
whose answers are limited to probabilities, a top-k or a label), optionally under a budget of rows sent to it.

Flow (`distill_blackbox`, the distill stage's flow for such a teacher: see stage.py):
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

import time

import numpy as np

from ..errors import CompressError, did_you_mean
from ..log import say
from ..models.outputs import PROB_FLOOR, check_probabilities, log_probs, output_kind, output_note

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
    """Whether the distill stage takes this flow: a budget, a top-k or label teacher output, or a callable/command
    teacher (so its calls are counted and cached) unless a feature that needs the teacher on every batch is on.
    Model files answering logits or probabilities (asked, or detected) take the white-box flow, where every loss, --search
    and function matching work: their probabilities become log-probabilities where the teacher's outputs are read."""
    from ..models.query_teacher import is_query_spec

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

    from ..data.streaming import iter_batches

    module.eval()
    with torch.inference_mode():
        return np.concatenate([module(torch.from_numpy(np.ascontiguousarray(xb))).float().numpy()
                               for xb in iter_batches(x, batch_size)]) if len(x) else np.zeros((0, 1), np.float32)


class _Queries:
    """The rounds of questions to a black-box teacher: which rows to ask, its answers so far (cached in the run after
    every round under the distill fingerprint) and the targets they make."""

    def __init__(self, run, split, pool, kind: str, k: int | None, make_student, resume: bool):
        self.run, self.split, self.pool, self.kind, self.k, self.make, self.resume = run, split, pool, kind, k, make_student, resume
        dcfg, self.teacher, self.ds = run.config.distill, run.teacher, run.data
        self.dcfg = dcfg
        self.qbs = 4 * dcfg.batch_size  # rows per call, as for the white-box teachers' pool pass
        self.who = f"the teacher ({self.teacher.spec if hasattr(self.teacher, 'spec') else self.teacher.format})"
        self.loss = LOSS_FOR[kind]
        self.cache_path, self.key = run.path("cache/teacher_queries.npz"), run.fingerprint("distill")
        self.cache = _load_cache(self.cache_path, self.key)
        self.num_classes, self.output = None, None
        self.queried, self.targets = np.zeros(0, np.int64), None
        self.rounds, self.scorer, self.teacher_seconds = [], None, 0.0

    def ask(self, rows: np.ndarray) -> tuple[np.ndarray, int]:
        from ..models.query_teacher import check_answer
        from .trainer import pick_device

        parts, calls, teacher, x = [], 0, self.teacher, self.ds.x
        teacher.to(pick_device(self.dcfg.device))
        try:
            for i in range(0, len(rows), self.qbs):
                xb = x[rows[i:i + self.qbs]]
                parts.append(teacher.answers(xb, batch_size=self.qbs) if hasattr(teacher, "answers")
                             else check_answer(teacher.logits(xb, batch_size=self.qbs), len(xb), self.who))
                calls += 1
        finally:
            teacher.to("cpu")
        if len({p.shape[1:] for p in parts}) > 1:
            raise CompressError(f"{self.who} answers batches in different shapes", hint="answer every batch with (N,) class ids or (N, classes) scores, always the same")
        return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), calls

    def training_set(self):
        rows = np.union1d(self.split.labeled_train, self.queried)
        t = np.full((len(rows), self.num_classes), np.nan, np.float32)
        t[np.searchsorted(rows, self.queried)] = self.targets
        return rows, t

    def train(self, name: str, rows, tlogits, loss_name: str, steps: int, ckpt: str):
        import torch

        from .jobs import train_job

        torch.manual_seed(self.dcfg.seed)
        module, _ = self.make(self.num_classes)
        return train_job(self.run, name, module, rows, tlogits, self.split, self.dcfg, steps=steps, loss=loss_name,
                         resume=self.resume, ckpt=ckpt)

    def _select(self, r: int, size: int, entry: dict) -> np.ndarray:
        """Round 1: a stratified random sample of the pool (or all of it); later rounds: the rows the student is least sure of."""
        from ..data.streaming import take

        remaining = np.setdiff1d(self.pool, self.queried)
        if r == 1:
            rows = stratified_sample(remaining, self.ds.y, size, self.dcfg.seed) if size < len(remaining) else remaining
            entry["selection"], how = ("random", "a stratified random sample") if size < len(remaining) else ("all", "every pool row")
        else:
            rows = remaining[np.sort(select_uncertain(_scores(self.scorer, take(self.ds.x, remaining)), size, self.dcfg.query_strategy))]
            entry["selection"], how = self.dcfg.query_strategy, f"the rows the student is least sure of ({self.dcfg.query_strategy})"
        entry["how"] = how
        return rows

    def one_round(self, r: int, size: int, last: int) -> None:
        from ..data import check_classes
        from .trainer import budget_steps

        entry = {"round": r}
        if r in self.cache:
            rows_r, ans_r, calls_r = self.cache[r]
            entry.update(selection=("all" if len(rows_r) >= len(self.pool) else "random") if r == 1 else self.dcfg.query_strategy, cached=True)
            say(f"distill: round {r}/{last}: {len(rows_r)} teacher answers from the run's cache")
        else:
            rows_r = self._select(r, size, entry)
            say(f"distill: round {r}/{last}: asking {self.who} about {len(rows_r)} rows, {entry.pop('how')}")
            t0 = time.perf_counter()
            ans_r, calls_r = self.ask(rows_r)
            self.teacher_seconds += time.perf_counter() - t0
            self.cache[r] = (rows_r, ans_r, calls_r)
            _save_cache(self.cache_path, self.key, self.cache)
            entry["cached"] = False
        if self.num_classes is None:
            self.num_classes = num_classes_from(ans_r, self.ds.num_classes, self.who)
            check_classes(self.ds, self.num_classes)
        if self.kind in ("auto", "logits", "probs") and ans_r.ndim == 2 and self.output is None:  # decided once, on the first answers
            self.output = output_kind(ans_r, self.kind, self.who)
            self.kind = self.output["kind"]
        t_r = to_targets(ans_r, self.kind, self.k, self.num_classes, self.who)
        self.queried = np.concatenate([self.queried, rows_r]).astype(np.int64)
        self.targets = t_r if self.targets is None else np.concatenate([self.targets, t_r])
        entry.update(rows=int(len(rows_r)), calls=int(calls_r))
        if r < last:  # a student to pick the next round's rows with
            rows, tl = self.training_set()
            steps_r = max(1, int(ROUND_STEPS_FRACTION * budget_steps(self.dcfg, len(rows))))
            self.scorer, res = self.train(f"round {r} student", rows, tl, self.loss, steps_r, f"student_round{r}.ckpt")
            entry.update(train_rows=int(len(rows)), steps=steps_r, val_accuracy=res.best_val_accuracy)
        self.rounds.append(entry)

    def record(self) -> dict:
        rows, calls = sum(e["rows"] for e in self.rounds), sum(e["calls"] for e in self.rounds)
        return {"output": f"topk:{self.k}" if self.kind == "topk" else self.kind, "budget": self.dcfg.query_budget,
                "strategy": self.dcfg.query_strategy, "pool_rows": int(len(self.pool)), "rows": int(rows), "calls": int(calls),
                "rows_per_call": self.qbs, "loss": self.loss, "rounds": self.rounds}


def _check_flow(dcfg) -> None:
    # the flow picks its loss from the teacher's output kind (bbkd/topk/pseudo); the default dist or kd both mean "that"
    bad = _online_features(dcfg) + ([f"--loss {dcfg.loss}"] if dcfg.loss not in ("kd", "dist") else [])
    if bad:
        raise CompressError(f"{', '.join(bad)} cannot be combined with a black-box teacher flow (--teacher-output {dcfg.teacher_output}"
                            f"{', --query-budget ' + str(dcfg.query_budget) if dcfg.query_budget else ''})",
                            hint="the teacher's answers are asked once per row and cached; drop those options")


def _check_budget(dcfg, ds) -> None:
    if dcfg.query_budget is not None and dcfg.query_budget < ds.num_classes:
        raise CompressError(f"--query-budget {dcfg.query_budget} is smaller than the number of classes ({ds.num_classes})",
                            hint=f"allow at least {ds.num_classes} rows (far more in practice: a few per class per round)")


def distill_blackbox(run, resume: bool) -> tuple[dict, dict]:
    """Train the student (and the baseline) from a teacher's answers under the run's black-box settings;
    returns (outputs, results) in the shape the white-box flow returns them, plus results['teacher_queries']."""
    import torch

    from .jobs import check_student_output, preflight, save_trained, student_factory, summary, validation_split
    from .trainer import budget_steps

    dcfg = run.config.distill
    kind, k = check_settings(dcfg)
    _check_flow(dcfg)
    teacher, ds = run.teacher, run.data
    _check_budget(dcfg, ds)
    split = validation_split(ds, dcfg)
    train_rows = split.train_rows
    pool = train_rows[ds.y[train_rows] < 0] if kind == "label" else train_rows
    if len(pool) == 0:
        pool = train_rows  # every row is labeled: a label-only teacher can still smooth them
    budget = min(dcfg.query_budget or len(pool), len(pool))
    sizes = round_sizes(budget, dcfg.query_rounds if budget < len(pool) else 1)
    make = student_factory(dcfg, ds, teacher, run.target)
    # before the first query (a paid teacher's rows cost money): the data's classes stand in
    preflight_info = preflight(run, make(ds.num_classes)[0], ds)
    q = _Queries(run, split, pool, kind, k, make, resume)
    for r, size in enumerate(sizes, start=1):
        q.one_round(r, size, len(sizes))

    rows, tl = q.training_set()
    steps = budget_steps(dcfg, len(rows))
    torch.manual_seed(dcfg.seed)
    student, record = make(q.num_classes)
    check_student_output(student, ds.x[:2], q.num_classes, dcfg.student)
    outputs, results = {}, {}
    jobs = [("student", q.loss, rows, tl)]
    if dcfg.baseline:
        jobs.append(("baseline", "labels", split.labeled_train, None))
    for name, loss_name, jrows, jt in jobs:
        module, res = q.train(name, jrows, jt, loss_name, steps, f"{name}.ckpt")
        save_trained(run, name, module, loss_name, res, jrows, outputs, results)
    results["teacher_queries"] = q.record()
    results["teacher_pass_seconds"] = round(q.teacher_seconds, 2)
    results["teacher_online"] = False
    if q.output is not None:
        results["teacher_output"] = q.output
        note = output_note(q.output)
        results["notes"] = [note] if note else []
    results.update(summary(student, record, q.num_classes, split, preflight_info, teacher, ds))
    tq = results["teacher_queries"]
    say(f"distill: the teacher answered {tq['rows']} rows in {tq['calls']} calls over {len(q.rounds)} round{'s' if len(q.rounds) != 1 else ''}")
    return outputs, results
