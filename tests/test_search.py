"""--search N: trials recorded and the best picked on validation accuracy, the held-out set never seen by the search,
an interrupted search resumed without redoing finished trials, pruning and failed trials, the report section, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compressor import api
from compressor.config import CompressConfig, DataConfig, DistillConfig
from compressor.distill import search as S
from compressor.errors import CompressError

ROOT = Path(__file__).resolve().parent.parent
# seed 1 draws a trial with augment=auto, so both the cached-teacher and the online-teacher trial paths run
SEED = 1


def _cfg(**distill) -> CompressConfig:
    d = dict(steps=100, search=3, search_steps=60, evals=5, device="cpu", seed=SEED)
    d.update(distill)
    return CompressConfig(data=DataConfig(mnist1d_samples=3000, mnist1d_labels=500, seed=SEED), distill=DistillConfig(**d))


class Spy:
    """Wraps train_student: records what every call was given; can raise KeyboardInterrupt on the Nth search trial."""

    def __init__(self, monkeypatch, interrupt_on_trial: int | None = None):
        from compressor.distill import trainer

        real = trainer.train_student
        self.real = getattr(real, "real", real)  # never wrap another spy
        self.calls, self.interrupt_on_trial = [], interrupt_on_trial
        monkeypatch.setattr(trainer, "train_student", self)

    def __call__(self, module, x, y, teacher_logits, x_val, y_val, cfg, **kw):
        search_calls = [c for c in self.calls if c["label"].startswith("search")]
        if kw["label"].startswith("search") and len(search_calls) == self.interrupt_on_trial:
            raise KeyboardInterrupt  # as Ctrl-C would, from inside the trial function
        self.calls.append({"label": kw["label"], "x": x.copy(), "x_val": x_val.copy(), "y_val": y_val.copy(), "cfg": cfg,
                           "steps": kw["steps"], "online": kw.get("online_teacher") is not None})
        return self.real(module, x, y, teacher_logits, x_val, y_val, cfg, **kw)

    def search_calls(self):
        return [c for c in self.calls if c["label"].startswith("search")]


def _rows(a: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in a.reshape(len(a), -1)}


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One uninterrupted 3-trial search run (train_student spied on)."""
    mp = pytest.MonkeyPatch()
    spy = Spy(mp)
    out = tmp_path_factory.mktemp("search") / "run"
    try:
        run = api.distill(_cfg(), out)
    finally:
        mp.undo()
    return run, spy


def test_search_records_distinct_trials_and_trains_the_student_with_the_best(searched):
    run, spy = searched
    res = run.manifest["stages"]["distill"]["result"]
    s = res["search"]
    trials = s["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2] and s["n_trials"] == 3 and s["steps_per_trial"] == 60
    assert all(t["state"] == "complete" and 0 <= t["val_accuracy"] <= 1 and t["seconds"] > 0 for t in trials)
    assert all(set(t["params"]) == set(S.SPACE) for t in trials)
    assert len({json.dumps(t["params"], sort_keys=True) for t in trials}) == 3, "every trial tries different settings"
    # trial 0 is the config's own settings
    assert trials[0]["params"] == {"loss": "dist", "temperature": 4.0, "alpha": 0.5, "logit_standardize": False, "lr": 3e-3, "augment": "none"}
    # the best is the highest validation accuracy (ties: the earlier trial)
    best = max(trials, key=lambda t: (t["val_accuracy"], -t["number"]))
    assert s["best"] == {"number": best["number"], "params": best["params"], "val_accuracy": best["val_accuracy"]}
    # each trial trained for search_steps with its settings; the student for the full budget with the best's
    calls = spy.search_calls()
    assert len(calls) == 3 and all(c["steps"] == 60 for c in calls)
    for c, t in zip(calls, trials):
        assert {k: getattr(c["cfg"], k) for k in S.SPACE} == t["params"]
        assert c["online"] == (t["params"]["augment"] != "none")
    assert {c["online"] for c in calls} == {False, True}, "SEED should draw trials with and without augmentation"
    student = [c for c in spy.calls if c["label"] == "student"]
    assert len(student) == 1 and student[0]["steps"] == 100
    assert {k: getattr(student[0]["cfg"], k) for k in S.SPACE} == best["params"]
    assert res["student"]["loss"] == best["params"]["loss"]
    # the checkpoint trials write is removed; the trials are kept in the run directory
    assert not (run.dir / "search" / "trial.ckpt").exists()
    assert len(json.loads((run.dir / "search" / "trials.json").read_text())["trials"]) == 3


def test_search_only_sees_the_validation_split_never_the_heldout_set(searched):
    from compressor.data import stratified_split

    run, spy = searched
    ds, dcfg = run.data, run.config.distill
    _, val = stratified_split(ds.y, dcfg.val_fraction, dcfg.seed)
    test_rows = _rows(ds.x_test)
    for c in spy.search_calls():
        np.testing.assert_array_equal(c["x_val"], ds.x[val])  # scored on the validation rows carved out of training
        np.testing.assert_array_equal(c["y_val"], ds.y[val])
        assert not (_rows(c["x_val"]) | _rows(c["x"])) & test_rows, "a held-out row reached the search"
        assert not _rows(c["x"]) & _rows(ds.x[val]), "validation rows must not be trained on"


def test_interrupted_search_resumes_and_runs_only_the_remaining_trial(searched, tmp_path, monkeypatch):
    out = tmp_path / "run"
    spy = Spy(monkeypatch, interrupt_on_trial=2)
    with pytest.raises(KeyboardInterrupt):
        api.distill(_cfg(), out)
    state = json.loads((out / "search" / "trials.json").read_text())
    assert [t["number"] for t in state["trials"]] == [0, 1]
    assert json.loads((out / "manifest.json").read_text())["stages"]["distill"]["status"] == "interrupted"
    assert len(spy.search_calls()) == 2 and not any(c["label"] == "student" for c in spy.calls)

    spy2 = Spy(monkeypatch)
    run = api.distill(_cfg(), out, resume=True)
    assert [c["label"] for c in spy2.search_calls()] == ["search trial 2 (3/3)"]  # trials 0 and 1 are not redone
    s = run.manifest["stages"]["distill"]["result"]["search"]
    assert [t["number"] for t in s["trials"]] == [0, 1, 2] and s["resumed_trials"] == 2
    assert [t.get("resumed", False) for t in s["trials"]] == [True, True, False]
    # seeded per trial: the resumed search proposes and measures what the uninterrupted one did
    ref = searched[0].manifest["stages"]["distill"]["result"]["search"]
    assert [(t["params"], t["val_accuracy"]) for t in s["trials"]] == [(t["params"], t["val_accuracy"]) for t in ref["trials"]]
    assert s["best"] == ref["best"]


def test_search_unit_pruning_failures_resume_and_best(tmp_path):
    """The search loop alone, with a fake trial: failed trials are recorded and skipped, clearly bad ones pruned,
    Ctrl-C keeps the finished trials, and a resume with other settings (another key) starts over."""
    state = tmp_path / "trials.json"
    calls = []

    def trial(number, overrides, report):
        calls.append(number)
        if number == 3:
            raise CompressError("search trial: the loss became nan at step 5", kind="runtime")
        if number == 7 and len(calls) == 8:
            raise KeyboardInterrupt
        value = 0.9 - 0.1 * number
        for step in range(10, 101, 10):
            report(step, value)
        return value

    with pytest.raises(KeyboardInterrupt):
        S.search(trial, DistillConfig(), 8, seed=0, steps=100, state_path=state, key="k")
    done = json.loads(state.read_text())["trials"]
    assert [t["number"] for t in done] == list(range(7))
    by = {t["number"]: t for t in done}
    assert by[3]["state"] == "failed" and by[3]["val_accuracy"] is None and "nan" in by[3]["error"]
    # after 5 complete trials, one below their median in the second half of its steps is pruned
    assert by[6]["state"] == "pruned" and by[6]["pruned_at_step"] == 50
    assert [by[n]["state"] for n in (0, 1, 2, 4, 5)] == ["complete"] * 5

    calls.clear()
    best, records = S.search(trial, DistillConfig(), 8, seed=0, steps=100, state_path=state, key="k", resume=True)
    assert calls == [7] and len(records) == 8
    assert best == records[0]["params"]  # 0.9: the highest validation accuracy
    calls.clear()
    S.search(trial, DistillConfig(), 2, seed=0, steps=100, state_path=state, key="other settings", resume=True)
    assert calls == [0, 1]

    def bad_input(number, overrides, report):
        raise CompressError("the student cannot run on data of shape (3,)")

    with pytest.raises(CompressError, match="cannot run"):  # bad input fails every trial alike: stop at once
        S.search(bad_input, DistillConfig(), 3, seed=0)

    def always_nan(number, overrides, report):
        raise CompressError("the loss became nan", kind="runtime")

    with pytest.raises(CompressError, match="none of the 2 search trials finished: the loss became nan") as e:
        S.search(always_nan, DistillConfig(), 2, seed=0)
    assert e.value.exit_code == 3


def test_default_search_steps():
    assert S.default_search_steps(3000) == 750
    assert S.default_search_steps(400) == 200
    assert S.default_search_steps(100) == 100  # never more than the full budget


def test_report_search_section_is_valid_and_rendered(searched):
    from compressor.bench.report import SEARCH_KEYS, render_markdown, validate_report

    rep = json.loads((ROOT / "tests" / "data" / "report.json").read_text())
    validate_report(rep)  # a report without a search stays valid
    s = searched[0].manifest["stages"]["distill"]["result"]["search"]
    rep["search"] = {k: v for k, v in s.items() if k in SEARCH_KEYS}
    validate_report(rep)
    md = render_markdown(rep)
    assert "## Hyper-parameter search" in md and "validation rows" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and ln.rstrip().endswith(("complete |", "complete** |"))]
    assert len(rows) == 3
    assert sum(ln.startswith("| **") for ln in rows) == 1  # the best trial in bold
    rep["search"]["trials"][0]["state"] = "done"
    with pytest.raises(CompressError, match="search"):
        validate_report(rep)


def test_loss_typo_is_a_did_you_mean_error_exit_2(cli, tmp_path):
    code, _, err = cli("--loss", "kdd", "--out", tmp_path / "run")
    assert code == 2
    assert "unknown distillation loss 'kdd'. Did you mean 'kd'?" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_flags_reach_the_config():
    from compressor.cli import _config_from, run_cmd

    ctx = run_cmd.make_context("run", ["--loss", "dkd", "--no-logit-standardize", "--search", "5", "--search-steps", "300"])
    d = _config_from(ctx.params).distill
    assert (d.loss, d.logit_standardize, d.search, d.search_steps) == ("dkd", False, 5, 300)
    d = _config_from(run_cmd.make_context("run", ["--logit-standardize"]).params).distill
    assert (d.loss, d.logit_standardize, d.search, d.search_steps) == ("dist", True, 0, None)


def test_cli_does_not_import_optuna():
    code = "import sys, compressor.cli; print('optuna' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip() == "False"
