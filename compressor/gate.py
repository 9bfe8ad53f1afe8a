"""`compress gate`: compare a run against a baseline, model by model, for CI.

Accuracy, agreement, size and floors come from the two reports. Latency is re-timed: when both sides have their model
files (a run directory, or a baseline bundle written by `--update-baseline`), the baseline's models and the current
ones are timed here, interleaved in rounds, in one process, and a regression needs both a one-sided test at `alpha`
(Wilcoxon signed-rank on the rounds, which are paired: both sides timed in the same round) and a slowdown above the
threshold (asv's rule). Milliseconds from two reports are
compared only when both come from the same host (fingerprint); across hosts such a check is a visible skip, "not
comparable", never a pass and never a fail. Any value the gate cannot trust (NaN, infinity, a zero latency, a bad
config) is an input error (exit 2), so a broken report can neither pass nor look like a regression.
"""
from __future__ import annotations

import logging
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .bench.host import host_fingerprint
from .bench.retime import BLACK_BOX
from .config import GateConfig
from .errors import CompressError

log = logging.getLogger("compressor")

PASS, FAIL, SKIP = "pass", "fail", "skip"
CONFIG_MAX_BYTES = 1 << 20


@dataclass
class Check:
    model: str
    check: str
    status: str
    baseline: str = ""
    current: str = ""
    limit: str = ""
    detail: str = ""


@dataclass
class GateResult:
    checks: list[Check] = field(default_factory=list)
    latency_mode: str = "re-timed here"

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def passed(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        n = {s: sum(c.status == s for c in self.checks) for s in (PASS, FAIL, SKIP)}
        verdict = "PASS" if self.passed else "FAIL"
        return f"gate {verdict}: {n[PASS]} passed, {n[FAIL]} failed, {n[SKIP]} skipped (latency: {self.latency_mode})"


def _number(v, where: str, lo: float | None = None, hi: float | None = None, *, integer: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise CompressError(f"{where} must be {'an integer' if integer else 'a number'}, not {v!r}")
    if not math.isfinite(v):
        raise CompressError(f"{where} is {v}; it must be a finite number")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise CompressError(f"{where} is {v:g}; it must lie in [{'' if lo is None else f'{lo:g}'}, {'' if hi is None else f'{hi:g}'}]")
    return v


def check_gate_config(cfg: GateConfig, where: str = "gate config") -> GateConfig:
    """Refuse (CompressError, exit 2) any threshold of the wrong type or range, before anything is compared."""
    _number(cfg.max_accuracy_drop, f"{where}: max_accuracy_drop", 0, 100)
    if cfg.min_agreement is not None:
        _number(cfg.min_agreement, f"{where}: min_agreement", 0, 1)
    _number(cfg.max_latency_regression, f"{where}: max_latency_regression", 0)
    _number(cfg.max_size_growth, f"{where}: max_size_growth", 0)
    _number(cfg.alpha, f"{where}: alpha", 1e-9, 0.5)
    _number(cfg.rounds, f"{where}: rounds", 5, 1000, integer=True)  # 5 paired rounds: smallest one-sided p 1/32
    _number(cfg.round_duration_s, f"{where}: round_duration_s", 0.001, 60)
    if not isinstance(cfg.absolute_latency, bool):
        raise CompressError(f"{where}: absolute_latency must be true or false, not {cfg.absolute_latency!r}")
    if cfg.models is not None and not (isinstance(cfg.models, list) and all(isinstance(m, str) for m in cfg.models)):
        raise CompressError(f"{where}: models must be a list of model names, not {cfg.models!r}")
    if cfg.floors is not None and not isinstance(cfg.floors, list):
        raise CompressError(f"{where}: floors must be [[floor]] tables, not {cfg.floors!r}")
    for f in cfg.floors or []:
        if not isinstance(f, dict) or not isinstance(f.get("model"), str) or not isinstance(f.get("metric"), str) or not ({"min", "max"} & set(f)):
            raise CompressError(f"gate floor {f!r} needs model, metric and min or max",
                                hint='e.g. [[floor]] model = "student onnx int8", metric = "accuracy", min = 0.93')
        if f["metric"] not in FLOOR_METRICS:
            raise CompressError(f"gate floor metric '{f['metric']}' is not one of {', '.join(FLOOR_METRICS)}")
        unknown = set(f) - {"model", "metric", "min", "max"}
        if unknown:
            raise CompressError(f"gate floor for '{f['model']}' has unknown keys {sorted(unknown)}")
        lo, hi = {"accuracy": (0, 1), "agreement": (0, 1)}.get(f["metric"], (0, None))
        for k in ("min", "max"):
            if k in f:
                _number(f[k], f"gate floor {f['model']}:{f['metric']} {k}", lo, hi)
    return cfg


def load_gate_config(path: str | Path | None, extra_floors: list[dict] | None = None, **overrides) -> GateConfig:
    """Defaults, then the TOML file's keys (a [gate] table or top level; floors as [[floor]]), then the overrides;
    extra_floors are added to the file's floors. Every value is type- and range-checked."""
    data = {}
    if path is not None:
        import tomllib

        from ._io import read_regular_file

        p = Path(path)
        # missing, a folder, a FIFO (would hang), /dev/zero (would fill the memory), or larger than a few thresholds can be
        text = read_regular_file(p, "gate config", CONFIG_MAX_BYTES, hint="pass a gate.toml")
        try:
            raw = tomllib.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
            raise CompressError(f"gate config {p} is not valid TOML: {str(exc)[:200] or type(exc).__name__}") from None
        if "gate" in raw:  # a [gate] table: its keys, plus [[floor]] tables at the top level; nothing else outside it
            if not isinstance(raw["gate"], dict):
                raise CompressError(f"gate config {p}: [gate] must be a table")
            outside = sorted(set(raw) - {"gate", "floor"})
            if outside:
                raise CompressError(f"gate config {p}: keys {outside} sit outside the [gate] table and would be ignored",
                                    hint="move them into [gate], or drop the [gate] header")
            data = dict(raw["gate"])
            if "floor" in raw:
                data["floor"] = list(data.get("floor") or []) + list(raw["floor"] if isinstance(raw["floor"], list) else [raw["floor"]])
        else:
            data = dict(raw)
        floors = data.pop("floor", None)
        if floors is not None:
            data["floors"] = floors
    try:
        cfg = GateConfig.from_dict(data) if data else GateConfig()
    except CompressError as exc:  # name the file: 'GateConfig: rounds must be …' alone does not say where
        raise CompressError(f"gate config {path}: {exc.message}", hint=exc.hint) from None
    cfg = cfg.replace(**overrides)
    if extra_floors:
        cfg = cfg.replace(floors=list(cfg.floors or []) + list(extra_floors))
    return check_gate_config(cfg, f"gate config {path}" if path else "gate settings")


FLOOR_METRICS = {"accuracy": lambda m: m["accuracy"], "agreement": lambda m: m["agreement"],
                 "latency_ms": lambda m: m["latency_ms"]["p50"], "size_bytes": lambda m: m["size_bytes"]}


def check_report_numbers(rep: dict, where: str) -> None:
    """Every number in the report's model rows must be finite: a NaN compares false both ways, so it would pass
    any threshold. Raises CompressError naming the first bad value."""
    def walk(v, path):
        if isinstance(v, bool):
            return
        if isinstance(v, float) and not math.isfinite(v):
            raise CompressError(f"{where}: {path} is {v}; the gate refuses non-finite values",
                                hint="re-bench the run; a report with NaN or infinite figures cannot be gated")
        if isinstance(v, dict):
            for k, w in v.items():
                walk(w, f"{path}.{k}")
        elif isinstance(v, list):
            for i, w in enumerate(v):
                walk(w, f"{path}[{i}]")
    for i, m in enumerate(rep["models"]):
        walk(m, f"models[{i}] ('{m.get('name')}')")
        if m.get("latency_measured_on", "host") == "host" and m["format"] not in BLACK_BOX:
            lat = m["latency_ms"]
            if lat["p50"] <= 0 or any(v <= 0 for v in lat.get("samples_p50") or []):
                raise CompressError(f"{where}: the latency of '{m['name']}' is zero; the gate cannot compare it",
                                    hint="re-bench the run (a zero p50 means the timer saw nothing)")


def _key(m: dict) -> tuple:
    return (m["role"], m["format"], m["precision"], m.get("latency_measured_on", "host"))


def _index(models: list[dict]) -> dict:
    """Rows addressable by (role, format, precision, where measured) when that is unique, and always by name."""
    keys: dict = {}
    for m in models:
        keys.setdefault(_key(m), []).append(m)
    out = {k: v[0] for k, v in keys.items() if len(v) == 1}
    out.update({m["name"]: m for m in models})
    return out


def _find(index: dict, m: dict) -> dict | None:
    got = index.get(_key(m))
    return got if got is not None else index.get(m["name"])


def _lookup(models: list[dict], spec: str) -> dict | None:
    """A model named by its name or by 'role/format/precision'."""
    for m in models:
        if m["name"] == spec or f"{m['role']}/{m['format']}/{m['precision']}" == spec:
            return m
    return None


def matches(current: dict, baseline: dict, cfg: GateConfig) -> list[tuple[dict, dict | None]]:
    """(baseline row, current row or None) for every baseline model the gate checks."""
    cur_index = _index(current["models"])
    wanted = set(cfg.models) if cfg.models else None
    out = []
    for b in baseline["models"]:
        if wanted is not None and b["name"] not in wanted and f"{b['role']}/{b['format']}/{b['precision']}" not in wanted:
            continue
        out.append((b, _find(cur_index, b)))
    return out


def _host_label(rep: dict) -> str:
    h = rep["host"]
    feats = "/".join(f for f in (h.get("cpu_features") or []) if f in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp"))
    return f"{h.get('cpu')} ({h.get('cpu_count')} cores{', ' + feats if feats else ''}{', ' + h['gpu'] if h.get('gpu') else ''})"


def host_difference(current: dict, baseline: dict) -> str | None:
    """None when the two reports come from the same host (fingerprint); else what differs, baseline -> current."""
    a, b = host_fingerprint(current), host_fingerprint(baseline)
    if a == b:
        return None
    return ", ".join(f"{k}: {b[k]} -> {a[k]}" for k in a if a[k] != b[k])


def _samples(m: dict) -> list[float] | None:
    s = m["latency_ms"].get("samples_p50")
    return list(s) if s and len(s) >= 2 else None


def wilcoxon_greater(current: list[float], baseline: list[float]) -> float:
    """One-sided p-value that current is slower than baseline round by round (scipy's Wilcoxon signed-rank test on the
    log ratios of rounds measured side by side: paired, so load that moves a whole round cancels)."""
    import numpy as np
    from scipy.stats import wilcoxon

    d = np.log(np.asarray(current, float) / np.asarray(baseline, float))
    if not np.any(d):
        return 1.0
    return float(wilcoxon(d, alternative="greater").pvalue)


def mann_whitney_greater(current: list[float], baseline: list[float]) -> float:
    """One-sided p-value that current's values are larger than baseline's (scipy's Mann-Whitney U)."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(current, baseline, alternative="greater").pvalue)


def gate(current: dict, baseline: dict, cfg: GateConfig, timed: dict | None = None, not_timed: dict | None = None) -> GateResult:
    """Compare two validated reports; every check is recorded (pass, fail or skip with the reason).
    timed: {baseline model name: (baseline rounds, current rounds)} in ms, measured here side by side (retime);
    not_timed: {name: why it could not be re-timed}, shown in the skips."""
    differ = _check_inputs(current, baseline, cfg)
    timed, not_timed = timed or {}, not_timed or {}
    res = GateResult()
    modes = {"re-timed here": 0, "from the reports (same host)": 0, "not comparable": 0}
    for b, c in matches(current, baseline, cfg):
        name = b["name"]
        if c is None:
            res.checks.append(Check(name, "present", FAIL, "yes", "missing", "", "the current report has no such model"))
            continue
        res.checks += _report_checks(name, b, c, cfg)
        chk, mode = _latency_check(name, b, c, cfg, timed.get(name) if not cfg.absolute_latency else None, differ,
                                   not_timed.get(name), current, baseline)
        res.checks.append(chk)
        if mode:
            modes[mode] += 1
    res.latency_mode = ", ".join(f"{n} {k}" for k, n in modes.items() if n) or "no latency checks"
    res.checks += [_floor_check(f, current, baseline) for f in cfg.floors or []]
    return res


def _check_inputs(current: dict, baseline: dict, cfg: GateConfig) -> str | None:
    """Refuse what the gate cannot compare (a bad config, a non-finite figure, --absolute-latency across hosts, a
    `models` entry naming nothing); returns how the two hosts differ (None: the same host)."""
    check_gate_config(cfg)
    check_report_numbers(current, "current report")
    check_report_numbers(baseline, "baseline")
    differ = host_difference(current, baseline)
    if cfg.absolute_latency and differ:
        raise CompressError(f"--absolute-latency needs both reports from the same host, but they differ ({differ})",
                            hint="let the gate re-time the baseline here: keep a baseline bundle (--update-baseline into a folder)")
    if cfg.models:
        unknown = [n for n in cfg.models if _lookup(baseline["models"], n) is None]
        if unknown:  # a typo here would check nothing and pass
            raise CompressError(f"models = {unknown} names no model of the baseline",
                                hint="models: " + ", ".join(x["name"] for x in baseline["models"]))
    return differ


def _report_checks(name: str, b: dict, c: dict, cfg: GateConfig) -> list[Check]:
    """Accuracy, agreement (when asked, students only) and size of one model, from the two reports."""
    drop = 100.0 * (b["accuracy"] - c["accuracy"])
    out = [Check(name, "accuracy", PASS if drop <= cfg.max_accuracy_drop else FAIL, f"{100 * b['accuracy']:.2f}%",
                 f"{100 * c['accuracy']:.2f}%", f"drop ≤ {cfg.max_accuracy_drop:g} pts", f"{0.0 - drop + 0.0:+.2f} pts")]
    if cfg.min_agreement is not None and c["role"] != "teacher":
        out.append(Check(name, "agreement", PASS if c["agreement"] >= cfg.min_agreement else FAIL, f"{100 * b['agreement']:.2f}%",
                         f"{100 * c['agreement']:.2f}%", f"≥ {100 * cfg.min_agreement:.2f}%"))
    if b["size_bytes"] > 0:
        growth = c["size_bytes"] / b["size_bytes"] - 1.0
        out.append(Check(name, "size", PASS if growth <= cfg.max_size_growth else FAIL, f"{b['size_bytes']:,} B",
                         f"{c['size_bytes']:,} B", f"growth ≤ {100 * cfg.max_size_growth:g}%", f"{100 * growth:+.1f}%"))
    else:
        out.append(Check(name, "size", SKIP, "0 B", f"{c['size_bytes']:,} B", detail="the baseline records no file size"))
    return out


def _floor_check(f: dict, current: dict, baseline: dict) -> Check:
    """One absolute floor on the current report; a model in neither report is a typo (CompressError), not a regression."""
    m = _lookup(current["models"], f["model"])
    if m is None:
        if _lookup(baseline["models"], f["model"]) is None:  # in neither report: a typo, not a regression
            raise CompressError(f"the floor names '{f['model']}', which is in neither report",
                                hint="models: " + ", ".join(x["name"] for x in baseline["models"]))
        return Check(f["model"], f"floor {f['metric']}", FAIL, "", "missing", "", "no such model in the current report")
    v = FLOOR_METRICS[f["metric"]](m)
    ok = ("min" not in f or v >= f["min"]) and ("max" not in f or v <= f["max"])
    limit = " and ".join(s for s in (f"≥ {f['min']:g}" if "min" in f else "", f"≤ {f['max']:g}" if "max" in f else "") if s)
    return Check(m["name"], f"floor {f['metric']}", PASS if ok else FAIL, "", f"{v:g}", limit)


def _decide(name: str, bs: list[float] | None, cs: list[float] | None, bv: float, cv: float, cfg: GateConfig, how: str,
            effect: float | None = None, paired: bool = False) -> Check:
    """Rounds on both sides: a regression needs p < alpha (Wilcoxon signed-rank on rounds timed side by side, paired;
    Mann-Whitney U on rounds from two reports) and a slowdown (effect, default cv/bv - 1) over the threshold.
    Otherwise the threshold alone decides on the two values."""
    effect = cv / bv - 1.0 if effect is None else effect
    limit = f"slowdown ≤ {100 * cfg.max_latency_regression:g}%"
    if bs and cs:
        test = "Wilcoxon" if paired else "Mann-Whitney"
        p = wilcoxon_greater(cs, bs) if paired else mann_whitney_greater(cs, bs)
        bad = p < cfg.alpha and effect > cfg.max_latency_regression
        return Check(name, "latency", FAIL if bad else PASS, f"{bv:.4f} ms", f"{cv:.4f} ms", f"{limit}, {test} p < {cfg.alpha:g}",
                     f"{100 * effect:+.1f}%, p = {p:.3g} ({len(bs)} vs {len(cs)} rounds, {how})")
    return Check(name, "latency", FAIL if effect > cfg.max_latency_regression else PASS, f"{bv:.4f} ms", f"{cv:.4f} ms", limit,
                 f"{100 * effect:+.1f}% ({how})")


def _latency_check(name, b, c, cfg, timed, differ, why_not, current, baseline) -> tuple[Check, str | None]:
    if timed is not None:  # both sides timed here, side by side, round by round
        return _retimed_check(name, timed, cfg), "re-timed here"
    if b.get("latency_measured_on", "host") != "host" or c.get("latency_measured_on", "host") != "host":
        if differ is None and b.get("device") == c.get("device"):
            pass  # same host and same device: the device's milliseconds compare like the host's
        else:
            return Check(name, "latency", SKIP, detail="not comparable: measured on a device; gate it with reports from the same device"), "not comparable"
    if b["format"] in BLACK_BOX:
        return Check(name, "latency", SKIP, detail="a black-box teacher's latency is not the model's"), None
    if differ is not None:
        return Check(name, "latency", SKIP, detail=_not_comparable(differ, why_not, current, baseline)), "not comparable"
    bs, cs = _samples(b), _samples(c)
    bv = min(bs) if bs else b["latency_ms"]["p50"]  # best round: bursts of other work only ever add time
    cv = min(cs) if cs else c["latency_ms"]["p50"]
    how = "same host, from the reports" + (f"; not re-timed: {why_not}" if why_not else "")
    return _decide(name, bs, cs, bv, cv, cfg, how), "from the reports (same host)"


def _retimed_check(name: str, timed: tuple, cfg: GateConfig) -> Check:
    """The latency check on rounds timed here: (baseline rounds, current rounds), side by side."""
    bs, cs = [float(v) for v in timed[0]], [float(v) for v in timed[1]]
    if not bs or len(bs) != len(cs) or min(bs) <= 0 or min(cs) <= 0 or not all(map(math.isfinite, bs + cs)):
        raise CompressError(f"re-timing '{name}' gave unusable times ({bs[:3]}..., {cs[:3]}...)", hint="rerun the gate")
    # the effect: the median over rounds of current/baseline measured in the same round (paired, so a slow round
    # slows both sides and moves no ratio)
    ratio = float(statistics.median(c / b for b, c in zip(bs, cs)))
    return _decide(name, bs, cs, float(statistics.median(bs)), float(statistics.median(cs)), cfg, "re-timed here, interleaved",
                   effect=ratio - 1.0, paired=True)


def _not_comparable(differ: str, why_not: str | None, current: dict, baseline: dict) -> str:
    """Why the reports' milliseconds from two hosts are not compared (and why they were not re-timed, if known)."""
    reason = f"not comparable: measured on {_host_label(baseline)}, now on {_host_label(current)}"
    if _host_label(baseline) == _host_label(current):
        reason = f"not comparable: the hosts differ ({differ})"
    if why_not:
        reason += f"; not re-timed: {why_not}"
    return reason


def compare(current: str | Path, baseline: str | Path, cfg: GateConfig) -> GateResult:
    """The gate on paths: open both sides, re-time every model both have files for, then compare."""
    from .bench.retime import open_side, plan_pairs, time_pairs

    check_gate_config(cfg)
    cur, base = open_side(current, "current report"), open_side(baseline, "baseline")
    timed, why = {}, {}
    if not cfg.absolute_latency:
        check_report_numbers(cur.report, "current report")
        check_report_numbers(base.report, "baseline")
        pairs, why = plan_pairs(base, cur, [(b, c) for b, c in matches(cur.report, base.report, cfg) if c is not None])
        if pairs:
            time_pairs(pairs, rounds=cfg.rounds, duration_s=cfg.round_duration_s)
            timed = {p.name: (p.base_samples, p.cur_samples) for p in pairs}
    return gate(cur.report, base.report, cfg, timed=timed, not_timed=why)


# --- output -------------------------------------------------------------------------------------------------------
def render_markdown(res: GateResult, current: str, baseline: str) -> str:
    icon = {PASS: "✅", FAIL: "❌", SKIP: "➖"}
    lines = [f"### compress gate: {'PASS' if res.passed else 'FAIL'}", "",
             f"`{current}` against the baseline `{baseline}`; latency: {res.latency_mode}.", "",
             "| model | check | baseline | current | limit | result |", "|---|---|---|---|---|---|"]
    for c in res.checks:
        lines.append(f"| {c.model} | {c.check} | {c.baseline} | {c.current} | {c.limit} | {icon[c.status]} {c.status}"
                     + (f" ({c.detail})" if c.detail else "") + " |")
    lines += ["", res.summary(), ""]
    return "\n".join(lines)


def junit_xml(res: GateResult, suite: str = "compress gate") -> str:
    """JUnit XML: one testcase per check (classname the model), failures and skips marked, for GitLab/Jenkins."""
    import xml.etree.ElementTree as ET

    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(res.checks)), failures=str(len(res.failed)), errors="0",
                       skipped=str(sum(c.status == SKIP for c in res.checks)))
    for c in res.checks:
        tc = ET.SubElement(ts, "testcase", classname=c.model, name=c.check, time="0")
        text = f"baseline {c.baseline or '-'}, current {c.current or '-'}, limit {c.limit or '-'}" + (f"; {c.detail}" if c.detail else "")
        if c.status == FAIL:
            ET.SubElement(tc, "failure", message=f"{c.model}: {c.check} regressed", type="regression").text = text
        elif c.status == SKIP:
            ET.SubElement(tc, "skipped", message=c.detail or "skipped")
        else:
            ET.SubElement(tc, "system-out").text = text
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def print_table(res: GateResult, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # CI logs: wide enough for the table not to wrap every cell
            console = Console(width=140)
    from .errors import rich_text

    t = Table(title=f"compress gate (latency: {res.latency_mode})")
    for col in ("model", "check", "baseline", "current", "limit", "result"):
        t.add_column(col)
    style = {PASS: "green", FAIL: "bold red", SKIP: "dim"}
    for c in res.checks:  # names and details come from report files: data, never Rich markup or terminal escapes
        t.add_row(*(rich_text(v) for v in (c.model, c.check, c.baseline, c.current, c.limit)),
                  f"[{style[c.status]}]{c.status}[/]" + (f" {rich_text(c.detail)}" if c.detail else ""))
    console.print(t)
    console.print(rich_text(res.summary()))


def github_summary(markdown: str) -> str | None:
    """Append to $GITHUB_STEP_SUMMARY when GitHub Actions sets it; returns the path written."""
    import stat

    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return None
    try:  # the verdict is already made: a summary file that cannot take it is a warning, never the gate's exit code
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError("not a regular file")
            os.write(fd, (markdown + "\n").encode("utf-8", "backslashreplace"))
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning(f"warning: GITHUB_STEP_SUMMARY={path}: cannot append the summary ({exc.strerror or exc})")
        return None
    return path


# --- compress gate as CI runs it: inputs, the comparison, its summaries, the new baseline, the exit code ------------
@dataclass
class GateOutcome:
    """What `run_gate` did: the comparison (None when there was no baseline yet to compare with), the sentence saying
    which baseline it wrote (None: none written), and the exit code (0 pass or a baseline written, 1 regression)."""

    result: GateResult | None = None
    baseline_written: str | None = None
    exit_code: int = 0


def report_for(path: str | Path, what: str) -> Path:
    """A report.json, or a run directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise CompressError(f"{what} {p} does not exist" + ("" if p.parent.exists() else " (nor does its folder)"),
                            hint="pass a report.json written by 'compress bench' (or its run directory)")
    return p


def parse_floor(text: str) -> dict:
    """--floor MODEL:METRIC>=VALUE (or <=VALUE) as a [[floor]] table."""
    import re

    m = re.fullmatch(r"\s*(.+?)\s*:\s*(\w+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*", text)
    if not m:
        raise CompressError(f"--floor '{text}' is not MODEL:METRIC>=VALUE or MODEL:METRIC<=VALUE", hint="e.g. 'student onnx int8:accuracy>=0.93'")
    model, metric, op, value = m.groups()
    try:
        v = float(value)
    except ValueError:
        v = None
    if v is None or v != v or v in (float("inf"), float("-inf")):
        raise CompressError(f"--floor '{text}': {value} is not a finite number")
    return {"model": model, "metric": metric, ("min" if op == ">=" else "max"): v}


_ARTIFACT_SUFFIXES = (".json", ".onnx", ".pt", ".pt2", ".npy", ".npz", ".lock", ".log", ".engine", ".gz", ".sh", ".py")


def _is_gate_input(out: Path, inputs: tuple) -> bool:
    """out is CURRENT or the baseline (a file), or a file of the kind the tool keeps inside either (a run or bundle
    folder: reports, manifests, models, checksums); a new summary such as RUN/gate.xml is fine."""
    try:
        o = Path(os.path.abspath(out)).parent.resolve() / out.name
        return any(_is_input(out, o, p) for p in inputs)
    except (OSError, RuntimeError):
        return True  # unresolvable (a link loop): not a place to write to


def _is_input(out: Path, o: Path, p: Path) -> bool:
    """out (o: its absolute path) is the input p, or an artifact inside the folder p."""
    r = p.resolve()
    if out.exists() and p.exists() and os.path.samefile(out, p):
        return True
    return p.is_dir() and o.is_relative_to(r) and (o.suffix.lower() in _ARTIFACT_SUFFIXES or o.name == "SHA256SUMS"
                                                   or o.name.startswith("report."))


def _check_summary_path(what: str, out, inputs: tuple) -> None:
    """--junit/--markdown: refused before the minutes of timing when a device, a link, a folder or one of the gate's inputs."""
    if out is None:
        return
    if Path(out).is_symlink() or (Path(out).exists() and not Path(out).is_file()):
        raise CompressError(f"{what} {out} exists and is not a regular file (a folder, a link or a device)", hint="give a file path")
    if _is_gate_input(Path(out), inputs):
        raise CompressError(f"{what} {out} is one of the gate's inputs (CURRENT, --baseline, or a file inside them)",
                            hint="write the summary somewhere else")


def _baseline_exists(baseline: Path) -> bool:
    b = Path(baseline)
    return (b / "report.json").is_file() if b.is_dir() else b.is_file()


def write_baseline(current: str | Path, baseline: str | Path, bundle: bool) -> str:
    """CURRENT as the new baseline: a baseline bundle in the folder `baseline` (bundle), or the bare report.json at
    `baseline`; returns the sentence saying what was written."""
    from shlex import quote

    from ._io import read_regular_file, write_bytes
    from .bench.report import REPORT_MAX_BYTES, load_report
    from .bench.retime import open_side, write_bundle

    if bundle:
        marker = write_bundle(open_side(current, "current report"), Path(baseline))
        return f"gate: wrote the baseline bundle {quote(str(baseline))} ({len(marker['files'])} files: {', '.join(sorted(marker['files']))})"
    cur_path = report_for(current, "current report")
    load_report(cur_path)
    write_bytes(baseline, read_regular_file(cur_path, "current report", REPORT_MAX_BYTES))
    return (f"gate: wrote {quote(str(cur_path))} as the new baseline {quote(str(baseline))} (a bare report: its latencies are comparable only "
            "on the same host; a folder as --baseline keeps the model files, which the gate re-times on any machine)")


def _write_summaries(res: GateResult, current, baseline, junit, markdown) -> None:
    """The Markdown summary (--markdown, $GITHUB_STEP_SUMMARY) and the JUnit XML (--junit)."""
    from ._io import write_text

    md = render_markdown(res, str(current), str(baseline))
    if markdown:
        write_text(markdown, md)
    github_summary(md)
    if junit:
        write_text(junit, junit_xml(res))


def run_gate(current: str | Path, baseline: str | Path, *, config_path: str | Path | None = None, floors=(), junit: str | Path | None = None,
             markdown: str | Path | None = None, update_baseline: bool = False, show=None, **thresholds) -> GateOutcome:
    """`compress gate`: check the inputs (the --update-baseline target, --floor texts, the summary paths) before any
    timing, build the GateConfig (defaults, config_path's gate.toml, then thresholds and floors), compare (`compare`),
    show(result) when given, write the summaries, then the new baseline when update_baseline. With update_baseline
    and no baseline yet, CURRENT becomes the baseline and nothing is compared."""
    bundle = update_baseline and (Path(baseline).is_dir() or Path(baseline).suffix.lower() != ".json")
    if bundle:
        from .bench.retime import check_bundle_target

        check_bundle_target(Path(baseline))  # before any comparison: never a folder of someone else's files
    if update_baseline and not _baseline_exists(baseline):  # the first baseline: nothing to compare yet
        return GateOutcome(baseline_written=write_baseline(current, baseline, bundle) + " (no baseline yet)")
    parsed = [parse_floor(f) for f in floors]
    for what, out in (("--junit", junit), ("--markdown", markdown)):  # before the minutes of timing
        _check_summary_path(what, out, (Path(current), Path(baseline)))
    cfg = load_gate_config(config_path, extra_floors=parsed, **thresholds)
    res = compare(current, baseline, cfg)
    if show is not None:
        show(res)
    _write_summaries(res, current, baseline, junit, markdown)
    if update_baseline:
        return GateOutcome(res, write_baseline(current, baseline, bundle))
    return GateOutcome(res, exit_code=0 if res.passed else 1)
