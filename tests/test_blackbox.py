"""Black-box teachers: a Python callable or a command you can only query, answers that are probabilities, a top-k
or a label, a budget on the rows sent, spent in rounds on the rows the student is least sure of."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from compressor import api
from compressor.config import CompressConfig, DataConfig, DistillConfig
from compressor.distill import blackbox
from compressor.distill.losses import get_loss
from compressor.errors import CompressError
from compressor.models import load_teacher
from conftest import CLASSES, make_signals

# A callable teacher: the fixture's trained teacher behind every kind of answer (and a few bad ones).
CALLABLE_SRC = '''
import numpy as np
import torch

_m = torch.jit.load({ts!r}).eval()
ROWS = []  # rows of every call, so a test can count what the teacher was asked


def _z(x):
    ROWS.append(len(x))
    with torch.no_grad():
        return _m(torch.from_numpy(np.asarray(x, np.float32))).numpy()


def logits(x):
    return _z(x)


def label(x):
    return _z(x).argmax(1)


def probs(x):
    z = _z(x)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def top2(x):
    p = probs(x)
    out = np.zeros_like(p)
    i = np.argsort(-p, 1)[:, :2]
    np.put_along_axis(out, i, np.take_along_axis(p, i, 1), 1)
    return out


def nan(x):
    return np.full((len(x), {classes}), np.nan, np.float32)


def short(x):
    return _z(x)[:-1]


def text(x):
    return "cat"


def fractional(x):
    return np.full(len(x), 0.5)


def boom(x):
    raise RuntimeError("quota exceeded")


def huge(x):
    return np.full(len(x), 2_000_000_000, np.int64)


def float_id(x):
    return np.full(len(x), 1e30)
'''

# A command teacher: reads a .npy batch on stdin, answers a .npy array on stdout; its argv goes to a log.
# numpy only (the fixture teacher's weights as an MLP), so each call starts in a fraction of a second.
COMMAND_SRC = '''
import io, json, sys
import numpy as np

x = np.load(io.BytesIO(sys.stdin.buffer.read()), allow_pickle=False)  # stdin is a pipe: read it whole first
with open({log!r}, "a") as fh:
    fh.write(json.dumps({{"argv": sys.argv[1:], "rows": len(x)}}) + "\\n")
mode = sys.argv[1]
if mode == "fail":
    print("boom: model offline", file=sys.stderr)
    sys.exit(3)
if mode == "garbage":
    print("hello")
    sys.exit(0)
if mode == "crash":
    raise ValueError("bad request: 413 payload too large")
w = np.load({weights!r})
h = x
for i in (0, 2, 4):
    h = h @ w[f"{{i}}.weight"].T + w[f"{{i}}.bias"]
    h = np.maximum(h, 0) if i < 4 else h
np.save(sys.stdout.buffer, h.argmax(1) if mode == "label" else h.astype(np.float32))
'''


@pytest.fixture(scope="module")
def teachers(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("bbteachers")
    py = d / "bb_teacher.py"
    py.write_text(CALLABLE_SRC.format(ts=str(tiny.torchscript), classes=CLASSES))
    log = d / "calls.jsonl"
    weights = d / "teacher_weights.npz"
    np.savez(weights, **{k: v.numpy() for k, v in torch.load(tiny.state_dict, weights_only=True).items()})
    cmd = d / "cmd_teacher.py"
    cmd.write_text(COMMAND_SRC.format(weights=str(weights), log=str(log)))
    return {"dir": d, "py": py, "cmd": cmd, "log": log}


def _cfg(tiny, teacher: str, data=None, **distill) -> CompressConfig:
    d = dict(steps=120, evals=4, device="cpu", student=tiny.student)
    d.update(distill)
    return CompressConfig(teacher=teacher, data=DataConfig(source=str(data or tiny.npz)), distill=DistillConfig(**d))


def _acc(run, name: str) -> float:
    m = run.load_trained(name)
    with torch.no_grad():
        return float((m(torch.from_numpy(run.data.x_test)).argmax(1).numpy() == run.data.y_test).mean())


def _result(run) -> dict:
    return run.manifest["stages"]["distill"]["result"]


# --- units: selection, sampling, conversion, losses ---------------------------------------------------------------
def test_margin_picks_the_least_certain_rows_and_entropy_the_most_uncertain():
    logits = np.log(np.array([
        [0.90, 0.05, 0.05],  # margin 0.85
        [0.34, 0.33, 0.33],  # margin 0.01  <- least certain by both
        [0.50, 0.45, 0.05],  # margin 0.05  <- second by margin (but lower entropy than row 3)
        [0.40, 0.30, 0.30],  # margin 0.10  <- second by entropy
        [0.98, 0.01, 0.01],
    ]))
    assert list(blackbox.select_uncertain(logits, 2, "margin")) == [1, 2]
    assert list(blackbox.select_uncertain(logits, 2, "entropy")) == [1, 3]
    assert list(blackbox.select_uncertain(logits, 10, "margin")) == [1, 2, 3, 0, 4]


def test_first_round_sample_is_seeded_and_stratified():
    y = np.array([0] * 60 + [1] * 30 + [-1] * 110)
    rows = np.arange(len(y))
    a = blackbox.stratified_sample(rows, y, 50, seed=3)
    assert np.array_equal(a, blackbox.stratified_sample(rows, y, 50, seed=3))
    assert len(np.unique(a)) == 50
    assert (np.bincount(y[a] + 1) == [28, 15, 7]).all()  # 55% unlabeled, 30% class 0, 15% class 1
    assert blackbox.round_sizes(10, 4) == [3, 3, 2, 2] and blackbox.round_sizes(3, 4) == [1, 1, 1]


def test_topk_answers_become_the_renormalised_top_k():
    p = np.array([[0.6, 0.3, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]], np.float32)
    t = blackbox.to_targets(p, "topk", 2, 4)
    assert np.isnan(t[0, 2:]).all() and np.isnan(t[1, :2]).all()  # only the top 2 are known
    np.testing.assert_allclose(np.exp(t[0, :2]), [2 / 3, 1 / 3], rtol=1e-5)
    np.testing.assert_allclose(np.exp(t[1, 2:]), [3 / 7, 4 / 7], rtol=1e-5)
    # logits give the same target as the probabilities they stand for; -inf may mark classes not given
    z = np.log(p + 1e-30)
    z[0, 3] = -np.inf
    np.testing.assert_allclose(blackbox.to_targets(z, "topk", 2, 4), t, rtol=1e-5)
    # probs become log-probabilities, label answers one-hot rows, logits pass through
    np.testing.assert_allclose(blackbox.to_targets(p[1:], "probs", None, 4), np.log(p[1:]), rtol=1e-5)
    np.testing.assert_array_equal(blackbox.to_targets(np.array([2, 0]), "label", None, 3), [[0, 0, 1], [1, 0, 0]])
    np.testing.assert_array_equal(blackbox.to_targets(p, "label", None, 4).argmax(1), [0, 3])
    np.testing.assert_array_equal(blackbox.to_targets(z[1:], "logits", None, 4), z[1:])


@pytest.mark.parametrize("answers, kind, k, match", [
    (np.array([[0.5, np.nan, 0.5]]), "logits", None, "NaN"),
    (np.array([[1.0, np.inf, 0.0]]), "logits", None, "Inf"),
    (np.array([[2.0, -1.0, 0.5]]), "probs", None, "not probabilities"),
    (np.array([[0.2, 0.2, 0.2]]), "probs", None, "not probabilities"),
    (np.array([[0.7, 0.3, 0.0]]), "topk", 4, "more classes than the teacher has"),
    (np.array([[0.7, -np.inf, -np.inf]]), "topk", 2, "fewer than 2 finite scores"),
    (np.array([1, 2]), "logits", None, "--teacher-output label"),
    (np.array([0, 7]), "label", None, "class 7, but there are only 3 classes"),
    (np.array([[0.5, 0.5]]), "logits", None, "2 scores per row, expected 3"),
])
def test_bad_answers_are_compress_errors(answers, kind, k, match):
    with pytest.raises(CompressError, match=match):
        blackbox.to_targets(answers, kind, k, 3)


@pytest.mark.parametrize("value, match", [("topk:0", "at least 1"), ("topk:abc", "whole number"), ("topk", "whole number"),
                                          ("logit", "Did you mean 'logits'"), ("softmax", "unknown --teacher-output")])
def test_teacher_output_values_are_checked(value, match):
    with pytest.raises(CompressError, match=match):
        blackbox.parse_teacher_output(value)
    assert blackbox.parse_teacher_output("TopK:5") == ("topk", 5)


def test_black_box_losses():
    torch.manual_seed(0)
    t = torch.randn(32, 5) * 3
    s = torch.randn(32, 5)
    unl = torch.full((32,), -1)
    cfg = DistillConfig(temperature=2.0, alpha=0.5)
    # with every class known, topk is Hinton's KD
    assert float(get_loss("topk")(s, t, unl, cfg)) == pytest.approx(float(get_loss("kd")(s, t, unl, cfg)), rel=1e-5)
    # rows without an answer train on their label alone; unlabeled rows without one are ignored
    y = torch.tensor([1, -1])
    none = torch.full((2, 5), float("nan"))
    ce = torch.nn.functional.cross_entropy(s[:1], y[:1])
    for name in ("topk", "pseudo"):
        assert float(get_loss(name)(s[:2], none, y, cfg)) == pytest.approx(float(ce), rel=1e-5)
    # pseudo: label-smoothed cross-entropy on the answered class
    onehot = torch.nn.functional.one_hot(t.argmax(1), 5).float()
    want = torch.nn.functional.cross_entropy(s, t.argmax(1), label_smoothing=0.1)
    assert float(get_loss("pseudo")(s, onehot, unl, cfg)) == pytest.approx(float(want), rel=1e-5)
    # minimising topk with the top 2 known: the student puts its mass on those 2 in the teacher's proportions
    target = torch.from_numpy(blackbox.to_targets(t.numpy(), "topk", 2, 5))
    z = torch.zeros(32, 5, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.1)
    for _ in range(400):
        opt.zero_grad()
        get_loss("topk")(z, target, unl, DistillConfig(temperature=1.0)).backward()
        opt.step()
    p = z.detach().softmax(1)
    known = ~torch.isnan(target)
    assert float(p[known].view(32, 2).sum(1).min()) > 0.97
    assert float((p.argmax(1) == t.argmax(1)).float().mean()) == 1.0


# --- teachers -----------------------------------------------------------------------------------------------------
def test_callable_and_command_teachers_answer_like_the_model(tiny, teachers):
    want = tiny.module()(torch.from_numpy(tiny.x[:10])).detach().numpy()
    t = load_teacher(f"{teachers['py']}:logits")
    assert (t.format, t.white_box, t.num_params(), t.runtime) == ("callable", False, None, "python")
    np.testing.assert_allclose(t.logits(tiny.x[:10], batch_size=4), want, rtol=1e-5, atol=1e-5)
    assert (t.calls, t.rows) == (3, 10)
    c = load_teacher(f"cmd:{sys.executable} {teachers['cmd']} label", cwd=str(teachers["dir"]))
    assert (c.format, c.white_box, c.num_params()) == ("command", False, None)
    np.testing.assert_array_equal(c.answers(tiny.x[:10]), want.argmax(1))
    with pytest.raises(CompressError, match="--teacher-output label"):
        c.logits(tiny.x[:3])


@pytest.mark.parametrize("fn, match", [("nan", "answered NaN for 4 of 4 rows"), ("short", r"shape \(3, 3\) for a batch of 4"),
                                       ("text", "not a numeric array"), ("fractional", "non-integer"),
                                       ("boom", "raised RuntimeError .*quota exceeded")])
def test_bad_callable_answers_are_compress_errors(tiny, teachers, fn, match):
    with pytest.raises(CompressError, match=match):
        load_teacher(f"{teachers['py']}:{fn}").answers(tiny.x[:4])


@pytest.mark.parametrize("mode, match", [("fail", r"exited with code 3: boom: model offline"),
                                         ("crash", "exited with code 1: ValueError: bad request: 413 payload too large"),
                                         ("garbage", "did not write a .npy array to stdout")])
def test_failing_command_names_the_command_and_its_stderr(tiny, teachers, mode, match):
    spec = f"cmd:{sys.executable} {teachers['cmd']} {mode}"
    with pytest.raises(CompressError, match=match) as e:
        load_teacher(spec).answers(tiny.x[:4])
    assert f"--teacher-cmd '{sys.executable} {teachers['cmd']} {mode}'" in str(e.value)


def test_command_that_hangs_is_a_runtime_error(tiny, tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import time\ntime.sleep(30)\n")
    t = load_teacher(f"cmd:{sys.executable} {script}")
    t.timeout_s = 0.5  # (600 s by default)
    with pytest.raises(CompressError, match=r"did not answer a batch of 4 rows within 0.5 s") as e:
        t.answers(tiny.x[:4])
    assert e.value.exit_code == 3


def test_missing_command_or_callable_is_a_compress_error(tmp_path):
    with pytest.raises(CompressError, match="'no-such-teacher-cmd' is not an executable command"):
        load_teacher("cmd:no-such-teacher-cmd --fast")
    with pytest.raises(CompressError, match="teacher .*missing.py does not exist"):
        api.distill(CompressConfig(teacher=f"{tmp_path}/missing.py:fn"), tmp_path / "run")
    with pytest.raises(CompressError, match="cannot be imported"):
        load_teacher("no_such_module_xyz:fn")


# --- the flow -----------------------------------------------------------------------------------------------------
def test_command_teacher_runs_without_a_shell_and_every_call_is_counted(tiny, teachers, tmp_path, monkeypatch):
    seen = []
    real = subprocess.run

    def spy(args, **kw):
        seen.append((args, kw.get("shell", False)))
        return real(args, **kw)

    monkeypatch.setattr(subprocess, "run", spy)
    teachers["log"].unlink(missing_ok=True)
    # a shell would run the $(...) and create the file; without one it is a literal argument
    marker = tmp_path / "PWNED"
    cmd = f"{sys.executable} {teachers['cmd']} label '$(touch {marker})'"
    cfg = _cfg(tiny, f"cmd:{cmd}", teacher_output="label", query_budget=100, query_rounds=2, batch_size=16)
    run = api.distill(cfg, tmp_path / "run")
    assert not marker.exists()
    assert seen and all(isinstance(a, list) and not shell for a, shell in seen)
    assert seen[0][0] == [sys.executable, str(teachers["cmd"]), "label", f"$(touch {marker})"]
    log = [json.loads(ln) for ln in teachers["log"].read_text().splitlines()]
    q = _result(run)["teacher_queries"]
    assert q["rows"] == sum(e["rows"] for e in log[:2]) == 100 and q["calls"] == 2
    held = _result(run)["teacher_heldout_queries"]  # then the held-out rows, once, for later stages (never asked again)
    assert held["rows"] == sum(e["rows"] for e in log[2:]) and len(log) == len(seen) == 2 + held["calls"]
    assert [e["rows"] for e in q["rounds"]] == [50, 50] and q["rows_per_call"] == 64
    assert _result(run)["teacher_format"] == "command"
    assert run.manifest["inputs"]["teacher"]["cwd"]


@pytest.mark.parametrize("budget, rounds", [(7, 3), (40, 4), (10_000, 4)])
def test_rows_sent_never_exceed_the_budget(tiny, teachers, tmp_path, monkeypatch, budget, rounds):
    monkeypatch.syspath_prepend(str(teachers["dir"]))
    import bb_teacher  # the same module object the teacher spec 'bb_teacher:label' loads

    bb_teacher.ROWS.clear()
    cfg = _cfg(tiny, "bb_teacher:label", teacher_output="label", query_budget=budget, query_rounds=rounds, steps=30, batch_size=8)
    q = _result(api.distill(cfg, tmp_path / "run"))["teacher_queries"]
    pool = int((tiny.y < 0).sum())  # a label-only teacher is asked about unlabeled rows only
    assert q["pool_rows"] == pool
    training = bb_teacher.ROWS[:q["calls"]]  # the held-out rows come after, outside the budget (teacher_heldout_queries)
    assert sum(training) == q["rows"] == sum(e["rows"] for e in q["rounds"]) == min(budget, pool)
    assert q["calls"] == sum(e["calls"] for e in q["rounds"])
    assert max(training) <= 32  # 4 x batch size per call
    assert len(q["rounds"]) == (rounds if budget < pool else 1)


def test_label_only_teacher_under_a_budget_beats_labels_alone(tiny, teachers, tmp_path):
    """Few labels, many unlabeled rows: 150 label-only answers chosen by margin beat the 40 labels alone."""
    rng = np.random.default_rng(7)
    x, y = make_signals(640, rng)
    y[40:] = -1
    data = tmp_path / "few.npz"
    np.savez(data, x=x, y=y, x_test=tiny.x_test, y_test=tiny.y_test)
    cfg = _cfg(tiny, f"{teachers['py']}:label", data=data, teacher_output="label", query_budget=150, query_rounds=3,
               steps=200, baseline=True, batch_size=32)
    run = api.distill(cfg, tmp_path / "run")
    res = _result(run)
    assert res["student"]["loss"] == "pseudo" and res["baseline"]["loss"] == "labels"
    assert res["teacher_queries"]["rows"] == 150 and [e["selection"] for e in res["teacher_queries"]["rounds"]] == ["random", "margin", "margin"]
    torch.manual_seed(123)
    from compressor.models import load_student

    untrained = load_student(res["student_record"], input_shape=x.shape[1:], num_classes=res["num_classes"])
    with torch.no_grad():
        acc_untrained = float((untrained(torch.from_numpy(tiny.x_test)).argmax(1).numpy() == tiny.y_test).mean())
    acc, acc_labels = _acc(run, "student"), _acc(run, "baseline")
    assert acc >= acc_untrained + 0.3, (acc, acc_untrained)
    assert acc >= acc_labels + 0.05, (acc, acc_labels)


def test_answers_are_cached_and_never_paid_for_twice(tiny, teachers, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(teachers["dir"]))
    import bb_teacher

    bb_teacher.ROWS.clear()
    cfg = _cfg(tiny, "bb_teacher:top2", teacher_output="topk:2", query_budget=60, query_rounds=2, steps=30)
    run = api.distill(cfg, tmp_path / "run")
    first = _result(run)["teacher_queries"]
    assert first["loss"] == "topk" and first["pool_rows"] == len(tiny.y) - _result(run)["val_rows"]  # soft answers: every row
    asked = sum(bb_teacher.ROWS)
    run = api.distill(cfg, tmp_path / "run", force=True)
    again = _result(run)["teacher_queries"]
    assert sum(bb_teacher.ROWS) == asked == 60 + sum(bb_teacher.ROWS[first["calls"]:])  # the rerun asked nothing
    assert _result(run)["teacher_heldout_queries"]["cached"]
    assert [e["cached"] for e in again["rounds"]] == [True, True] and again["rows"] == first["rows"]


def test_whole_pool_is_asked_once_without_a_budget(tiny, teachers, tmp_path):
    cfg = _cfg(tiny, f"{teachers['py']}:probs", teacher_output="probs", steps=60)
    res = _result(api.distill(cfg, tmp_path / "run"))
    q = res["teacher_queries"]
    assert q["budget"] is None and q["rows"] == q["pool_rows"] == len(tiny.y) - res["val_rows"]
    assert q["rounds"] == [{"round": 1, "selection": "all", "cached": False, "rows": q["rows"], "calls": q["calls"]}]
    assert res["student"]["loss"] == "bbkd" and res["num_classes"] == CLASSES


def test_callable_teacher_file_is_hashed_and_a_change_is_caught(tiny, teachers, tmp_path):
    py = tmp_path / "t.py"
    py.write_text(teachers["py"].read_text())
    cfg = _cfg(tiny, f"{py}:logits", steps=30)  # logits, no budget: the black-box flow still counts the calls
    run = api.distill(cfg, tmp_path / "run")
    assert run.manifest["inputs"]["teacher"]["sha256"] == __import__("hashlib").sha256(py.read_bytes()).hexdigest()
    assert _result(run)["teacher_queries"]["rows"] > 0 and _result(run)["student"]["loss"] == "bbkd"
    py.write_text(py.read_text() + "\n# retrained\n")
    from compressor.run import Run

    with pytest.raises(CompressError, match="changed since this run started"):
        Run.open(tmp_path / "run").teacher


def test_budget_below_the_number_of_classes_and_online_options_are_refused(tiny, teachers, tmp_path):
    with pytest.raises(CompressError, match="--query-budget 2 is smaller than the number of classes"):
        api.distill(_cfg(tiny, str(tiny.torchscript), teacher_output="label", query_budget=2), tmp_path / "a")
    with pytest.raises(CompressError, match="--augment signal, --loss dkd cannot be combined with a black-box teacher flow"):
        api.distill(_cfg(tiny, f"{teachers['py']}:probs", teacher_output="probs", query_budget=50, augment="signal", loss="dkd"), tmp_path / "b")


def test_config_round_trips_with_black_box_settings():
    cfg = CompressConfig(teacher="cmd:python ask.py --model big", distill=DistillConfig(teacher_output="topk:3", query_budget=500,
                                                                                       query_rounds=2, query_strategy="entropy"))
    assert CompressConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# --- CLI and report -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, match", [
    (["--teacher-output", "topk:0"], "K must be at least 1"),
    (["--teacher-output", "topk:abc"], "K must be a whole number"),
    (["--teacher-output", "logit"], "Did you mean 'logits'"),
    (["--query-budget", "0"], "--query-budget"),
    (["--query-strategy", "random"], "--query-strategy"),
    (["--teacher-cmd", "python t.py"], "either --teacher or --teacher-cmd"),
])
def test_bad_black_box_options_are_usage_errors(cli, tiny, tmp_path, args, match):
    code, _, err = cli("distill", "--teacher", tiny.torchscript, "--data", tiny.npz, "--out", tmp_path / "run", *args)
    assert code == 2 and match in err, err


def test_cli_budget_below_classes_is_one_line_exit_2(cli, tiny, tmp_path):
    code, _, err = cli("distill", "--teacher", tiny.torchscript, "--data", tiny.npz, "--out", tmp_path / "run",
                       "--teacher-output", "label", "--query-budget", "2")
    assert code == 2 and err.count("\n") == 1 and "smaller than the number of classes (3)" in err, err


def test_cli_command_teacher_pipeline_reports_the_teacher_calls(cli, tiny, teachers, tmp_path, tiny_bench):
    out = tmp_path / "run"
    code, _, err = cli("distill", "--teacher-cmd", f"{sys.executable} {teachers['cmd']} label", "--teacher-output", "label",
                       "--query-budget", "90", "--query-rounds", "2", "--data", tiny.npz, "--student", tiny.student,
                       "--steps", "40", "--batch-size", "16", "--no-baseline", "--out", out)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["teacher"] == f"cmd:{sys.executable} {teachers['cmd']} label"
    assert manifest["config"]["distill"]["teacher_output"] == "label" and manifest["config"]["distill"]["query_budget"] == 90
    api.export(out)
    api.quantize(out)
    rep = api.bench(out, tiny_bench)
    api.report(out)
    md = (out / "report.md").read_text()
    q = rep["checks"]["distill"]["teacher_queries"]
    assert (q["rows"], q["calls"], q["budget"], len(q["rounds"])) == (90, 2, 90, 2)
    assert "Teacher queries: 90 rows in 2 calls over 2 rounds (budget 90 of 160 pool rows); the teacher answers label" in md
    teacher = next(m for m in rep["models"] if m["role"] == "teacher")
    assert (teacher["format"], teacher["runtime"], teacher["params"]) == ("command", "subprocess", 0)
    assert teacher["accuracy"] == pytest.approx(float((tiny.module()(torch.from_numpy(tiny.x_test)).argmax(1).numpy() == tiny.y_test).mean()))
    assert any("distill stage also asked it about" in n for n in rep["notes"])


# --- probabilities detected, class ids out of range (issue 17) ----------------------------------------------------
def test_black_box_probabilities_are_detected_on_the_first_answers(tiny, teachers, tmp_path):
    """Default --teacher-output (auto): a callable answering softmax rows is read as probabilities (their log), noted."""
    res = _result(api.distill(_cfg(tiny, f"{teachers['py']}:probs", query_budget=60, query_rounds=1, steps=30), tmp_path / "a"))
    assert res["teacher_output"]["kind"] == "probs" and res["teacher_output"]["detected"] and res["teacher_output"]["rows"] == 60
    assert res["teacher_queries"]["output"] == "probs" and any("outputs are probabilities" in n for n in res["notes"])
    res = _result(api.distill(_cfg(tiny, f"{teachers['py']}:logits", query_budget=60, query_rounds=1, steps=30), tmp_path / "b"))
    assert res["teacher_output"]["kind"] == "logits" and not res["teacher_output"]["detected"] and res["notes"] == []
    res = _result(api.distill(_cfg(tiny, f"{teachers['py']}:probs", teacher_output="logits", query_budget=60, query_rounds=1, steps=30),
                              tmp_path / "c"))
    assert res["teacher_output"]["kind"] == "logits" and res["teacher_queries"]["output"] == "logits"  # asked: no detection


def test_detection_needs_enough_rows_and_classes():
    from compressor.models.outputs import are_probabilities, output_kind

    rng = np.random.default_rng(0)
    z = rng.standard_normal((1000, 10)).astype(np.float32)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert output_kind(p, "auto")["kind"] == "probs"
    assert output_kind(p, "logits")["kind"] == "logits"
    assert output_kind(z, "auto")["kind"] == "logits" and output_kind(np.abs(z), "auto")["kind"] == "logits"
    assert output_kind(p[:4], "auto")["kind"] == "logits"  # too few rows to tell
    assert not are_probabilities(np.ones((50, 1)))  # one class: always "sums to 1"
    assert output_kind(p.astype(np.float16), "auto")["kind"] == "probs"  # half-precision softmax still sums to 1 closely enough


def test_label_teacher_answering_a_huge_class_id_is_exit_2_without_allocating(cli, tiny, teachers, tmp_path):
    import time

    with pytest.raises(CompressError, match=r"class id 2000000000 \(answered by the teacher\) is out of range: the data has 3 classes"):
        blackbox.num_classes_from(np.array([1, 2_000_000_000]), 3)
    assert blackbox.num_classes_from(np.array([0, 5]), 3) == 6  # a few classes beyond the data's labels are still allowed
    t0 = time.perf_counter()
    code, _, err = cli("distill", "--teacher", f"{teachers['py']}:huge", "--teacher-output", "label", "--data", tiny.npz,
                       "--skip-preflight", "--steps", "5", "--out", tmp_path / "run")
    errors = [ln for ln in err.splitlines() if ln.startswith(("error", "internal error"))]
    assert code == 2 and len(errors) == 1 and "class id 2000000000 (answered by" in errors[0] and "is out of range" in errors[0], err
    assert time.perf_counter() - t0 < 60
    code, _, err = cli("distill", "--teacher", f"{teachers['py']}:float_id", "--teacher-output", "label", "--data", tiny.npz,
                       "--skip-preflight", "--steps", "5", "--out", tmp_path / "run2")
    assert code == 2 and "out of range" in err, err
