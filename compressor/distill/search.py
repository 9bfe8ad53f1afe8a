"""``--search N``: a budgeted hyper-parameter search over the distillation knobs, scored on the validation split.

One entry point, :func:`search`, runs N trials with Optuna's TPE sampler (seeded) over :data:`SPACE`. Each trial is
a call ``trial_fn(number, overrides, report) -> val_accuracy``: the caller trains a student with
``cfg.replace(**overrides)`` for a short budget and returns its best accuracy on the validation rows carved out of the
training data (never the held-out set). ``report(step, accuracy)`` feeds Optuna's MedianPruner; it raises
:class:`Pruned` when the trial is clearly worse than the median of the finished ones at the same step.

Trial 0 is the configuration's own settings (clamped into the space), so the search never picks something worse on
validation than what you asked for. Every finished trial (complete, pruned or failed) is written atomically to a JSON
file as soon as it ends; a resumed search re-seeds Optuna's in-memory study with them (``study.add_trial``) and runs
only the trials that are left. The sampler is re-seeded from (seed, trial number) before each trial, so a resumed
search proposes the same settings as an uninterrupted one would.

:func:`search_for_distill` wires this to the distill stage (the trial function, the run directory's state file).
Optuna is imported only here, only when a search runs.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .._io import sha256_json, write_json
from ..errors import CompressError

log = logging.getLogger("compressor")

STATE_VERSION = 1
# name: (kind, low/choices, high, log) -- the knobs a trial may change; the rest of the config is fixed.
SPACE = {
    "loss": ("categorical", ["kd", "dkd", "dist"]),
    "temperature": ("float", 1.0, 8.0, True),
    "alpha": ("float", 0.0, 1.0, False),
    "logit_standardize": ("categorical", [False, True]),
    "lr": ("float", 1e-3, 1e-2, True),
    "augment": ("categorical", ["none", "auto"]),
}
MIN_SEARCH_STEPS = 200


class Pruned(Exception):
    """Raised by a trial's report() when the pruner stops it; the trial function lets it propagate."""


def default_search_steps(full_steps: int) -> int:
    """Steps per trial when --search-steps is not given: a quarter of the full budget, at least 200 (never more than it)."""
    return min(full_steps, max(MIN_SEARCH_STEPS, full_steps // 4))


def describe(params: dict) -> str:
    p = params
    return (f"loss {p['loss']}, T {p['temperature']:.2f}, alpha {p['alpha']:.2f}, "
            f"logit std {'on' if p['logit_standardize'] else 'off'}, lr {p['lr']:.2e}, augment {p['augment']}")


def _distributions() -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    out = {}
    for name, spec in SPACE.items():
        if spec[0] == "categorical":
            out[name] = CategoricalDistribution(spec[1])
        else:
            out[name] = FloatDistribution(spec[1], spec[2], log=spec[3])
    return out


def _start_params(cfg) -> dict:
    """The config's own settings, clamped into the space (the first trial)."""
    out = {}
    for name, spec in SPACE.items():
        v = getattr(cfg, name)
        if spec[0] == "categorical":
            out[name] = v if v in spec[1] else spec[1][0]
        else:
            out[name] = float(min(max(float(v), spec[1]), spec[2]))
    return out


def _sampler_seed(seed: int, number: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, number]).generate_state(1)[0])


def _load_state(path: Path | None, key: str) -> list[dict]:
    """Finished trials from an earlier, interrupted search with the same settings; [] when there are none."""
    if path is None or not path.is_file():
        return []
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(state, dict) and state.get("version") == STATE_VERSION
        trials = state["trials"]
        assert isinstance(trials, list) and all(isinstance(t, dict) and {"number", "state", "params"} <= set(t) for t in trials)
    except (OSError, ValueError, KeyError, AssertionError):
        log.warning(f"search: {path} is unreadable; starting the search over")
        return []
    if state.get("key") != key:
        log.info(f"search: {path} was made with other settings; starting the search over")
        return []
    trials = sorted(trials, key=lambda t: t["number"])
    if [t["number"] for t in trials] != list(range(len(trials))):
        log.warning(f"search: {path} has gaps in its trial numbers; starting the search over")
        return []
    return trials


def search(trial_fn: Callable[[int, dict, Callable[[int, float], None]], float], cfg, n_trials: int, seed: int, *,
           steps: int | None = None, state_path: str | Path | None = None, key: str = "", resume: bool = False) -> tuple[dict, list[dict]]:
    """Run n_trials trials (TPE, seeded) over SPACE; returns (the best trial's overrides, every trial's record).

    steps: the trials' step budget (only used to set the pruner's warm-up). state_path: a JSON file that every finished
    trial is written to; with resume=True, trials already in it (made with the same key) are not run again.
    A trial whose training fails at run time (NaN loss, out of memory) is recorded as failed and the search goes on;
    any other error, and Ctrl-C, stop the search (finished trials stay in state_path)."""
    import optuna
    from optuna.trial import TrialState, create_trial

    if n_trials < 1:
        raise CompressError(f"--search needs at least 1 trial, got {n_trials}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own one line per trial instead of Optuna's
    dists = _distributions()
    state_path = Path(state_path) if state_path is not None else None
    done = _load_state(state_path, key) if resume else []
    done = done[:n_trials]
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=_sampler_seed(seed, 0)),
        # prune a trial when its best validation accuracy so far is below the median of the finished trials' at the same
        # step; only after 5 finished trials and in the second half of a trial (early accuracy is mostly the schedule)
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=(steps or 0) // 2),
    )
    states = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}
    for t in done:
        study.add_trial(create_trial(params=t["params"], distributions=dists, state=states[t["state"]],
                                     value=t["val_accuracy"] if t["state"] == "complete" else None,
                                     intermediate_values={int(s): float(v) for s, v in t.get("intermediate", [])}))
    if done:
        log.info(f"search: resuming with {len(done)} of {n_trials} trials already finished")
        for t in done:
            t["resumed"] = True  # finished by an earlier, interrupted run
    records = list(done)

    def save():
        if state_path is not None:  # under torchrun every rank searches; write_json writes on rank 0 only
            write_json(state_path, {"version": STATE_VERSION, "key": key, "seed": seed, "n_trials": n_trials, "trials": records})

    # the first half of the trials (at least 2, counting trial 0; at most 10, Optuna's default) sample at random,
    # then TPE models the finished ones
    startup = max(2, min(10, n_trials // 2))
    while len(records) < n_trials:
        number = len(records)
        study.sampler = optuna.samplers.TPESampler(seed=_sampler_seed(seed, number), n_startup_trials=startup)
        if number == 0:
            study.enqueue_trial(_start_params(cfg))
        trial = study.ask(dists)
        assert trial.number == number, (trial.number, number)
        params = {k: trial.params[k] for k in SPACE}
        intermediate: dict[int, float] = {}
        best_so_far = -math.inf

        def report(step: int, accuracy: float) -> None:
            nonlocal best_so_far
            best_so_far = max(best_so_far, float(accuracy))
            intermediate[int(step)] = best_so_far
            trial.report(best_so_far, int(step))
            if trial.should_prune():
                raise Pruned(f"pruned at step {step}")

        rec = {"number": number, "params": params}
        t0 = time.perf_counter()
        try:
            value = float(trial_fn(number, dict(params), report))
        except Pruned:
            study.tell(trial, state=TrialState.PRUNED)
            rec.update(state="pruned", val_accuracy=best_so_far if intermediate else None,
                       pruned_at_step=max(intermediate) if intermediate else None)
        except CompressError as exc:
            if exc.kind != "runtime":  # bad input fails every trial the same way: stop here
                raise
            study.tell(trial, state=TrialState.FAIL)
            rec.update(state="failed", val_accuracy=None, error=str(exc))
        else:
            study.tell(trial, value)
            rec.update(state="complete", val_accuracy=value)
        rec.update(seconds=round(time.perf_counter() - t0, 2), intermediate=sorted(intermediate.items()))
        records.append(rec)
        save()  # atomically, after every trial: an interrupt loses at most the trial that was running
        acc = f"val acc {rec['val_accuracy']:.4f}" if rec["val_accuracy"] is not None else "no val acc"
        log.info(f"search: trial {number} ({number + 1}/{n_trials}) {rec['state']}: {describe(params)} -> {acc} ({rec['seconds']:.1f} s)")

    return dict(best_trial(records)["params"]), records


def best_trial(records: list[dict]) -> dict:
    """The complete trial with the highest validation accuracy; ties go to the earlier trial (trial 0 = your settings)."""
    complete = [r for r in records if r["state"] == "complete"]
    if not complete:
        first = next((r.get("error") for r in records if r.get("error")), "every trial was pruned")
        raise CompressError(f"none of the {len(records)} search trials finished: {first}",
                            hint="fix the cause above, or run without --search", kind="runtime")
    return max(complete, key=lambda r: (r["val_accuracy"], -r["number"]))


def public_records(records: list[dict]) -> list[dict]:
    """Trial records for the manifest and the report (without the per-step validation curve)."""
    return [{k: v for k, v in r.items() if k != "intermediate"} for r in records]


def search_for_distill(run, dcfg, teacher, ds, train_rows, x_val, y_val, pool_logits, build_module: Callable[[], object], *,
                       full_steps: int, resume: bool) -> tuple[dict, dict]:
    """The distill stage's search: each trial trains a fresh student (same seed) on the training rows for
    search_steps steps with the trial's settings and is scored on (x_val, y_val), the validation split carved out of
    the training rows -- the held-out set is never passed in. Trials with augmentation run the teacher online;
    the others use its cached outputs for the pool (pool_logits, computed here if the run has none).
    Returns (the best settings as DistillConfig overrides, the stage result's "search" section)."""
    import torch

    from .teacher_pass import online_teacher, teacher_online, teacher_pool_logits
    from .trainer import train_student

    steps = int(dcfg.search_steps) if dcfg.search_steps else default_search_steps(full_steps)
    state_path = run.path("search/trials.json")
    ckpt = run.path("search/trial.ckpt")
    cfg = run.manifest["config"]
    # what a finished trial's result depends on: everything but the number of trials and the baseline
    key = sha256_json({"inputs": run.manifest["inputs"], "data": cfg["data"], "teacher_arch": cfg.get("teacher_arch"), "steps": steps,
                       "distill": {k: v for k, v in dcfg.to_dict().items() if k not in ("search", "baseline")}, "space": SPACE})
    from ..data.streaming import take

    x, y = take(ds.x, train_rows), ds.y[train_rows]
    cached = [pool_logits]

    def trial_fn(number: int, overrides: dict, report) -> float:
        tcfg = dcfg.replace(**overrides)
        torch.manual_seed(dcfg.seed)
        module = build_module()
        kw, tlogits = {}, None
        if teacher_online(tcfg):
            kw = online_teacher(teacher, module, ds.x[:2], tcfg)
        else:
            if cached[0] is None:
                cached[0] = teacher_pool_logits(run, teacher, ds, dcfg)[0]
            tlogits = take(cached[0], train_rows)
        try:
            _, res = train_student(module, x, y, tlogits, x_val, y_val, tcfg, steps=steps, checkpoint=ckpt,
                                   label=f"search trial {number} ({number + 1}/{dcfg.search})", loss_name=tcfg.loss, on_eval=report, **kw)
        finally:
            if kw.get("hint") is not None:
                kw["hint"].remove()
            teacher.to("cpu")
        return res.best_val_accuracy

    log.info(f"distill: searching {dcfg.search} trials of {steps} steps, scored on {len(y_val)} validation rows")
    t0 = time.perf_counter()
    try:
        best, records = search(trial_fn, dcfg, dcfg.search, dcfg.seed, steps=steps, state_path=state_path, key=key, resume=resume)
    finally:
        ckpt.unlink(missing_ok=True)
    winner = best_trial(records)
    log.info(f"distill: search picked trial {winner['number']} ({describe(best)}), val acc {winner['val_accuracy']:.4f}")
    result = {"n_trials": dcfg.search, "steps_per_trial": steps, "scored_on": "validation", "val_rows": int(len(y_val)),
              "sampler": f"optuna {_optuna_version()} TPE (seed {dcfg.seed})", "pruner": "median",
              "seconds": round(time.perf_counter() - t0, 2), "resumed_trials": sum(1 for r in records if r.get("resumed")),
              "best": {"number": winner["number"], "params": best, "val_accuracy": winner["val_accuracy"]},
              "trials": public_records(records)}
    return best, result


def _optuna_version() -> str:
    import optuna

    return optuna.__version__
