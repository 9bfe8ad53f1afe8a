"""compress gate on reports: exit codes (0 pass, 1 regression, 2 bad input, 4 the gate's own error), same-host vs
"not comparable" latency, the Mann-Whitney rule on repeated rounds, fail-closed inputs, floors and config files, JUnit XML
(parsed with junitparser), the Markdown summary, --update-baseline, and compress bench --repeat writing the rounds the
gate tests. Re-timing a baseline bundle beside a real run: tests/test_gate_retime.py."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from compressor import api
from compressor.bench.report import validate_report
from compressor.config import BenchConfig, CompressConfig, DataConfig, DistillConfig, GateConfig
from compressor.gate import gate

BASE = json.loads((Path(__file__).parent / "data" / "report.json").read_text())


def _write(path: Path, rep: dict) -> Path:
    path.write_text(json.dumps(rep))
    return path


def _model(rep: dict, name: str) -> dict:
    return next(m for m in rep["models"] if m["name"] == name)




@pytest.fixture
def reports(tmp_path):
    return _write(tmp_path / "base.json", BASE), tmp_path


def _regressed() -> dict:
    rep = copy.deepcopy(BASE)
    m = _model(rep, "student onnx int8")
    m["accuracy"] -= 0.05  # 5 points
    for k in ("p50", "p90", "p99", "mean"):
        m["latency_ms"][k] *= 2.0
    return rep


def test_same_report_passes(reports, cli):
    base, _ = reports
    code, out, _ = cli("gate", base, "--baseline", base)
    assert code == 0 and "gate PASS" in out and "0 failed" in out


def test_lost_accuracy_and_doubled_latency_fail_with_exit_1(reports, cli):
    base, tmp = reports
    cur = _write(tmp / "cur.json", _regressed())
    code, out, _ = cli("gate", cur, "--baseline", base)
    assert code == 1 and "gate FAIL" in out
    res = gate(_regressed(), BASE, GateConfig())
    assert {(c.model, c.check) for c in res.failed} == {("student onnx int8", "accuracy"), ("student onnx int8", "latency")}


@pytest.mark.parametrize("case", ["missing", "not-json", "invalid-schema", "missing-baseline", "bad-config", "bad-floor", "nan-p50",
                                  "inf-accuracy", "nan-round", "zero-p50", "huge-size", "floor-not-a-number", "floor-inf",
                                  "config-wrong-type", "config-bool-for-number", "config-floor-string", "config-unknown-key",
                                  "config-negative", "config-rounds-float", "deep-json", "oversized-json", "config-folder",
                                  "absolute-across-hosts", "config-fifo", "config-gate-table-floor-outside", "models-typo",
                                  "floor-unknown-model", "floor-out-of-range", "junit-folder", "markdown-symlink"])
def test_bad_input_exits_2_with_one_line(reports, cli, case, monkeypatch):
    """Fail closed: every value the gate cannot trust is exit 2 with one line naming it, never a pass, never exit 1."""
    base, tmp = reports
    args = ["gate", base, "--baseline", base]
    bad = copy.deepcopy(BASE)
    int8 = _model(bad, "student onnx int8")
    toml = None
    if case == "missing":
        args[1] = tmp / "nope.json"
    elif case == "not-json":
        args[1] = tmp / "bad.json"
        args[1].write_text("{not json")
    elif case == "invalid-schema":
        del bad["models"][0]["accuracy"]
    elif case == "missing-baseline":
        args[3] = tmp / "no-baseline.json"
    elif case == "bad-config":
        toml = "max_accuracy_drop = ["
    elif case == "bad-floor":
        args += ["--floor", "student accuracy at least 0.9"]
    elif case == "nan-p50":
        int8["latency_ms"]["p50"] = float("nan")
    elif case == "inf-accuracy":
        int8["accuracy"] = float("inf")
    elif case == "nan-round":
        int8["latency_ms"]["samples_p50"] = [0.01, float("nan"), 0.01]
    elif case == "zero-p50":
        int8["latency_ms"]["p50"] = 0.0
    elif case == "huge-size":
        int8["size_bytes"] = 1e400  # parses as infinity
    elif case == "floor-not-a-number":
        args += ["--floor", "student onnx int8:accuracy>=0.9.9"]
    elif case == "floor-inf":
        args += ["--floor", "student onnx int8:accuracy>=1e999"]
    elif case == "config-wrong-type":
        toml = 'max_accuracy_drop = "half a point"'
    elif case == "config-bool-for-number":
        toml = "max_latency_regression = true"
    elif case == "config-floor-string":
        toml = '[[floor]]\nmodel = "student onnx int8"\nmetric = "accuracy"\nmin = "0.9"'
    elif case == "config-unknown-key":
        toml = "max_acuracy_drop = 1.0"
    elif case == "config-negative":
        toml = "max_size_growth = -0.5"
    elif case == "config-rounds-float":
        toml = "rounds = 7.5"
    elif case == "deep-json":
        args[1] = tmp / "deep.json"
        args[1].write_text("[" * 100_000 + "]" * 100_000)
    elif case == "oversized-json":
        from compressor.bench import report as report_mod

        monkeypatch.setattr(report_mod, "REPORT_MAX_BYTES", 1000)
    elif case == "config-folder":
        args += ["--config", tmp]
    elif case == "config-fifo":  # would hang forever if read
        import os

        os.mkfifo(tmp / "fifo")
        args += ["--config", tmp / "fifo"]
    elif case == "config-gate-table-floor-outside":  # keys outside [gate] would be silently ignored
        toml = 'max_accuracy_drop = "garbage"\n[gate]\nrounds = 7'
    elif case == "models-typo":  # would check nothing and pass
        toml = 'models = ["studnet onnx int8"]'
    elif case == "floor-unknown-model":
        args += ["--floor", "studnet onnx int8:accuracy>=0.5"]
    elif case == "floor-out-of-range":
        args += ["--floor", "student onnx int8:accuracy>=1e5"]
    elif case == "junit-folder":
        (tmp / "jdir").mkdir()
        args += ["--junit", tmp / "jdir"]
    elif case == "markdown-symlink":
        (tmp / "real.md").write_text("mine")
        (tmp / "link.md").symlink_to(tmp / "real.md")
        args += ["--markdown", tmp / "link.md"]
    else:  # --absolute-latency between two hosts
        bad["host"]["cpu"] = "Another CPU"
        args.append("--absolute-latency")
    if case in ("nan-p50", "inf-accuracy", "nan-round", "zero-p50", "huge-size", "invalid-schema", "absolute-across-hosts"):
        args[1] = tmp / "bad.json"
        args[1].write_text(json.dumps(bad))  # json.dumps writes NaN / Infinity, as a buggy writer would
    if toml is not None:
        (tmp / "gate.toml").write_text(toml)
        args += ["--config", tmp / "gate.toml"]
    code, out, err = cli(*args)
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 3 and "internal error" not in err and "gate PASS" not in out
    if case == "markdown-symlink":
        assert (tmp / "link.md").is_symlink() and (tmp / "real.md").read_text() == "mine"
    if case in ("nan-p50", "inf-accuracy", "nan-round", "huge-size"):
        assert ("student onnx int8" in err or "models/4/" in err) and ("nan" in err or "inf" in err)  # names the value


def test_compress_gate_with_a_nan_p50_exits_2(reports, cli):
    base, tmp = reports
    bad = copy.deepcopy(BASE)
    _model(bad, "student onnx int8")["latency_ms"]["p50"] = float("nan")
    (tmp / "nan.json").write_text(json.dumps(bad))
    for cur, b in ((tmp / "nan.json", base), (base, tmp / "nan.json")):  # on either side
        code, _, err = cli("gate", cur, "--baseline", b)
        assert code == 2 and "p50 is nan" in err, err


def test_an_internal_error_in_gate_is_exit_4_not_a_verdict(reports, cli, monkeypatch):
    import compressor.gate as gate_mod

    base, _ = reports

    def boom(*a, **k):
        raise KeyError("a bug")
    monkeypatch.setattr(gate_mod, "compare", boom)
    code, _, err = cli("gate", base, "--baseline", base)
    assert code == 4 and "internal error" in err
    assert cli("targets")[0] == 0  # other commands keep their codes
    monkeypatch.setattr(gate_mod, "compare", lambda *a, **k: 1 / 0)
    assert cli("gate", base, "--baseline", base)[0] == 4


def test_same_host_reports_compare_milliseconds_and_other_hosts_are_not_comparable(reports, cli):
    """A bare report carries no model files: on the same host (fingerprint) its p50s are compared; from another host
    the latency checks are visible skips naming both hosts, never a pass or a fail; --absolute-latency refuses."""
    base, tmp = reports
    slower = copy.deepcopy(BASE)  # every model 3x slower
    for m in slower["models"]:
        for k in ("p50", "p90", "p99", "mean"):
            m["latency_ms"][k] *= 3.0
    code, out, _ = cli("gate", _write(tmp / "slower.json", slower), "--baseline", base)
    assert code == 1 and "same host, from the reports" in out
    other = copy.deepcopy(slower)
    other["host"]["cpu"] = "Intel Xeon"
    code, out, _ = cli("gate", _write(tmp / "other.json", other), "--baseline", base, "--markdown", tmp / "g.md")
    assert code == 0
    res = gate(other, BASE, GateConfig())
    lat = [c for c in res.checks if c.check == "latency"]
    assert lat and all(c.status == "skip" for c in lat)
    assert all("not comparable: measured on AMD EPYC (2 cores, avx2/avx512_vnni), now on Intel Xeon (2 cores, avx2/avx512_vnni)" in c.detail
               for c in lat)
    zen3 = copy.deepcopy(BASE)  # the same CPU name on a machine without AVX-512 VNNI: another host, too
    zen3["host"]["cpu_features"] = ["avx2"]
    lat = [c for c in gate(zen3, BASE, GateConfig()).checks if c.check == "latency"]
    assert all(c.status == "skip" and "now on AMD EPYC (2 cores, avx2)" in c.detail for c in lat), lat
    assert "not comparable" in (tmp / "g.md").read_text() and "not comparable" in res.summary()
    code, _, err = cli("gate", tmp / "other.json", "--baseline", base, "--absolute-latency")
    assert code == 2 and "same host" in err


def _with_rounds(rep: dict, rng, scale: dict[str, float] | None = None, outlier: str | None = None, rounds: int = 7) -> dict:
    """Every model gets `rounds` p50 samples with the noise measured on this shared machine (benchmarks/results/gate_fpr.md):
    1% jitter that only adds time, and bursts of other work that slow a round by 30-100% one time in five. A model in
    scale is that much slower; outlier: one round of that model is 3x slower."""
    rep = copy.deepcopy(rep)
    for m in rep["models"]:
        s = (scale or {}).get(m["name"], 1.0)
        bursts = np.where(rng.random(rounds) < 0.2, rng.uniform(1.3, 2.0, rounds), 1.0)
        samples = m["latency_ms"]["p50"] * s * (1 + 0.01 * np.abs(rng.standard_normal(rounds))) * bursts
        if m["name"] == outlier:
            samples[2] *= 3.0
        m["latency_ms"].update(samples_p50=[float(v) for v in samples], p50=float(np.median(samples)), rounds=rounds)
    return validate_report(rep)


def test_repeated_rounds_use_mann_whitney_and_an_effect_size():
    rng = np.random.default_rng(0)
    base = _with_rounds(BASE, rng)
    same = gate(_with_rounds(BASE, rng), base, GateConfig())
    assert same.passed and any("Mann-Whitney" in c.limit for c in same.checks)
    burst = gate(_with_rounds(BASE, rng, outlier="student onnx fp32"), base, GateConfig())
    assert burst.passed, [c for c in burst.failed]  # one slow round is not a regression
    slow = gate(_with_rounds(BASE, rng, scale={"student onnx fp32": 1.3}), base, GateConfig())
    assert [(c.model, c.check) for c in slow.failed] == [("student onnx fp32", "latency")]
    small = gate(_with_rounds(BASE, rng, scale={"student onnx fp32": 1.05}), base, GateConfig())
    assert small.passed  # significant, perhaps, but under the 10% effect threshold


def test_floors_from_config_and_flags(reports, cli):
    base, tmp = reports
    (tmp / "gate.toml").write_text('max_accuracy_drop = 1.0\n\n[[floor]]\nmodel = "student onnx int8"\nmetric = "accuracy"\nmin = 0.99\n')
    code, out, _ = cli("gate", base, "--baseline", base, "--config", tmp / "gate.toml")
    assert code == 1 and "floor accuracy" in out
    code, _, _ = cli("gate", base, "--baseline", base, "--floor", "student onnx int8:accuracy>=0.9", "--floor", "student/onnx/fp32:latency_ms<=1")
    assert code == 0


def test_missing_model_is_a_regression(reports, cli):
    base, tmp = reports
    rep = copy.deepcopy(BASE)
    rep["models"] = [m for m in rep["models"] if m["name"] != "student onnx int8"]
    code, out, _ = cli("gate", _write(tmp / "cur.json", rep), "--baseline", base)
    assert code == 1 and "missing" in out


def test_junit_xml_parses_and_markdown_goes_to_the_step_summary(reports, cli, monkeypatch):
    from junitparser import Failure, JUnitXml, Skipped

    base, tmp = reports
    cur = _write(tmp / "cur.json", _regressed())
    summary = tmp / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code, _, _ = cli("gate", cur, "--baseline", base, "--junit", tmp / "gate.xml", "--markdown", tmp / "gate.md")
    assert code == 1
    xml = JUnitXml.fromfile(str(tmp / "gate.xml"))
    cases = [c for suite in xml for c in suite]
    failed = {(c.classname, c.name) for c in cases if any(isinstance(r, Failure) for r in c.result)}
    assert failed == {("student onnx int8", "accuracy"), ("student onnx int8", "latency")}
    assert not any(isinstance(r, Skipped) for c in cases for r in c.result)  # same host: every latency compared
    assert len(cases) == len(gate(_regressed(), BASE, GateConfig()).checks)
    text = summary.read_text()
    assert text.startswith("earlier step\n")  # appended, not overwritten
    assert "### compress gate: FAIL" in text and "| student onnx int8 | accuracy |" in text and "❌ fail" in text
    assert (tmp / "gate.md").read_text().strip() in text


def test_update_baseline_writes_the_current_report(reports, cli):
    base, tmp = reports
    cur = _write(tmp / "cur.json", _regressed())
    code, out, _ = cli("gate", cur, "--baseline", base, "--update-baseline")
    assert code == 0 and "new baseline" in out
    assert json.loads(base.read_text()) == _regressed()
    assert not list(tmp.glob(".*.tmp"))
    first = tmp / "fresh" / "baseline.json"
    first.parent.mkdir()
    assert cli("gate", cur, "--baseline", first, "--update-baseline")[0] == 0  # no baseline yet: it becomes one
    assert json.loads(first.read_text()) == _regressed()


def test_bench_repeat_records_rounds_the_gate_reads(tiny, tmp_path, cli):
    cfg = CompressConfig(teacher=str(tiny.torchscript), data=DataConfig(source=str(tiny.npz)), target="cpu",
                         distill=DistillConfig(steps=60, evals=2, device="cpu"),
                         bench=BenchConfig(min_runs=5, min_duration_s=0.01, warmup_ms=1, warmup_runs=1))
    api.compress(cfg, out=tmp_path / "run")
    rep = api.bench(tmp_path / "run", BenchConfig(min_runs=5, min_duration_s=0.01, warmup_ms=1, warmup_runs=1, repeat=3), force=True)
    for m in rep["models"]:
        s = m["latency_ms"]["samples_p50"]
        assert len(s) == 3 and m["latency_ms"]["p50"] == pytest.approx(float(np.median(s)))
    code, out, _ = cli("gate", tmp_path / "run", "--baseline", tmp_path / "run" / "report.json")
    assert code == 0 and "p = " in out  # the rounds were tested


def test_bench_defaults_to_rounds_and_sweeps_batches_on_request(tiny, tmp_path):
    """The default bench measures in 3 interleaved rounds (p95 too) and flags a spread over 5%; --batch-sweep gives
    each ONNX model's throughput at every batch size."""
    from compressor.bench.report import render_markdown

    cfg = CompressConfig(teacher=str(tiny.torchscript), data=DataConfig(source=str(tiny.npz)), target="cpu",
                         distill=DistillConfig(steps=40, evals=2, device="cpu"),
                         bench=BenchConfig(min_runs=5, min_duration_s=0.01, warmup_ms=1, warmup_runs=1))
    rep = api.compress(cfg, out=tmp_path / "run")
    assert BenchConfig().repeat == 3
    for m in rep["models"]:
        lat = m["latency_ms"]
        assert lat["rounds"] == 3 and len(lat["samples_p50"]) == 3 and lat["p95"] >= lat["p50"]
        assert lat["noisy"] == (lat["rounds_spread"] > 0.05 or lat["cv"] > 0.15)
    rep = api.bench(tmp_path / "run", BenchConfig(min_runs=5, min_duration_s=0.01, warmup_ms=1, warmup_runs=1, repeat=1,
                                                  batch_sweep=[1, 4, 16]), force=True)
    onnx_rows = [m for m in rep["models"] if m["format"] == "onnx"]
    assert onnx_rows and all([p["batch"] for p in m["throughput"]] == [1, 4, 16] for m in onnx_rows)
    assert all(p["items_per_s"] == pytest.approx(1e3 * p["batch"] / p["p50_ms"]) for m in onnx_rows for p in m["throughput"])
    assert not any("throughput" in m for m in rep["models"] if m["format"] != "onnx")
    md = render_markdown(rep)
    assert "Throughput (items/s" in md and "| student onnx int8 |" in md


def test_the_example_gate_toml_and_the_ci_one_load():
    from compressor.gate import load_gate_config

    root = Path(__file__).resolve().parent.parent
    for path in (root / "examples" / "ci" / "gate.toml", root / "benchmarks" / "baselines" / "ci" / "gate.toml"):
        cfg = load_gate_config(path)
        assert cfg.rounds == 7 and cfg.floors and cfg.floors[0]["model"] == "student onnx int8"


def test_floors_under_a_gate_table_are_kept(reports, cli):
    base, tmp = reports
    (tmp / "gate.toml").write_text('[gate]\nmax_accuracy_drop = 1.0\n\n[[floor]]\nmodel = "student onnx int8"\nmetric = "accuracy"\nmin = 0.99\n')
    code, out, _ = cli("gate", base, "--baseline", base, "--config", tmp / "gate.toml")
    assert code == 1 and "floor accuracy" in out
