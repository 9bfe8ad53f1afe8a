"""`compress gate`: compare a report.json against a baseline report, model by model, for CI.

Accuracy, agreement, size and floors are compared directly. Latency, by default, is compared as ratios measured
inside each run (every model's p50 over the reference model's, normally the teacher), which survive a change of CI
machine; absolute latencies only with absolute_latency and when the two hosts' fingerprints match. When both reports
carry repeated measurements (`compress bench --repeat N`), a latency regression needs both a one-sided Mann-Whitney U
test at `alpha` and an effect larger than the threshold (asv's rule), so one noisy round does not fail a build.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


from .config import GateConfig
from .errors import CompressError

PASS, FAIL, SKIP = "pass", "fail", "skip"
BLACK_BOX = ("callable", "command")


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
    latency_mode: str = "ratio"
    reference: str | None = None

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def passed(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        n = {s: sum(c.status == s for c in self.checks) for s in (PASS, FAIL, SKIP)}
        verdict = "PASS" if self.passed else "FAIL"
        return f"gate {verdict}: {n[PASS]} passed, {n[FAIL]} failed, {n[SKIP]} skipped (latency compared as {self.latency_mode})"


def load_gate_config(path: str | Path | None, extra_floors: list[dict] | None = None, **overrides) -> GateConfig:
    """Defaults, then the TOML file's keys (a [gate] table or top level; floors as [[floor]]), then the overrides;
    extra_floors are added to the file's floors."""
    data = {}
    if path is not None:
        import tomllib

        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CompressError(f"gate config {p} does not exist") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise CompressError(f"gate config {p} is not valid TOML: {exc}") from None
        raw = raw.get("gate", raw)
        floors = raw.pop("floor", None)
        data = dict(raw)
        if floors is not None:
            data["floors"] = floors
    cfg = GateConfig.from_dict(data) if data else GateConfig()
    cfg = cfg.replace(**overrides)
    if extra_floors:
        cfg = cfg.replace(floors=list(cfg.floors or []) + list(extra_floors))
    for f in cfg.floors or []:
        if not isinstance(f, dict) or "model" not in f or "metric" not in f or not ({"min", "max"} & set(f)):
            raise CompressError(f"gate floor {f!r} needs model, metric and min or max",
                                hint='e.g. [[floor]] model = "student onnx int8", metric = "accuracy", min = 0.93')
        if f["metric"] not in FLOOR_METRICS:
            raise CompressError(f"gate floor metric '{f['metric']}' is not one of {', '.join(FLOOR_METRICS)}")
    return cfg


FLOOR_METRICS = {"accuracy": lambda m: m["accuracy"], "agreement": lambda m: m["agreement"],
                 "latency_ms": lambda m: m["latency_ms"]["p50"], "size_bytes": lambda m: m["size_bytes"]}


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


def _reference(models: list[dict]) -> dict | None:
    """The model latency ratios are taken against: the teacher, unless it is a black box; then the PyTorch student."""
    for m in models:
        if m["role"] == "teacher" and m["format"] not in BLACK_BOX and m.get("latency_measured_on", "host") == "host":
            return m
    return next((m for m in models if m["role"] == "student" and m["format"] == "pytorch"), None)


def host_fingerprint(rep: dict) -> dict:
    h = rep["host"]
    threads = sorted({m.get("threads") for m in rep["models"] if m.get("threads") is not None})
    return {"cpu": h.get("cpu"), "cpu_count": h.get("cpu_count"), "gpu": h.get("gpu"), "threads": threads,
            "onnxruntime": h.get("versions", {}).get("onnxruntime"), "torch": h.get("versions", {}).get("torch")}


def _samples(m: dict) -> list[float] | None:
    s = m["latency_ms"].get("samples_p50")
    return list(s) if s and len(s) >= 2 else None


def _latency_series(m: dict, ref: dict | None) -> tuple[float, list[float] | None]:
    """(value, per-round samples or None). Without rounds the value is p50 (or p50 over the reference's p50). With
    rounds it is the best round (over the reference's best round): on a shared machine other work comes in bursts
    that only ever add time, so the fastest round is the model's own cost; the samples are per-round values for the test."""
    a = _samples(m)
    if ref is None:
        return (min(a) if a else m["latency_ms"]["p50"]), a
    b = _samples(ref)
    if a and b:  # each round over the reference's best round: a burst that slowed the reference moves no ratio
        return min(a) / min(b), [x / min(b) for x in a]
    return m["latency_ms"]["p50"] / ref["latency_ms"]["p50"], None


def mann_whitney_greater(current: list[float], baseline: list[float]) -> float:
    """One-sided p-value that current's values are larger than baseline's (scipy's Mann-Whitney U)."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(current, baseline, alternative="greater").pvalue)


def gate(current: dict, baseline: dict, cfg: GateConfig) -> GateResult:
    """Compare two validated reports; every check is recorded (pass, fail or skip with the reason)."""
    res = GateResult(latency_mode="absolute p50" if cfg.absolute_latency else "ratio to the reference model")
    if cfg.absolute_latency:
        a, b = host_fingerprint(current), host_fingerprint(baseline)
        if a != b:
            diff = ", ".join(f"{k}: {b[k]} -> {a[k]}" for k in a if a[k] != b[k])
            raise CompressError(f"--absolute-latency needs both reports from the same host, but they differ ({diff})",
                                hint="compare latency as ratios (the default), or make the baseline on this host")
    cur_index = _index(current["models"])
    cur_ref, base_ref = _reference(current["models"]), _reference(baseline["models"])
    if not cfg.absolute_latency:
        res.reference = base_ref["name"] if base_ref else None
    wanted = set(cfg.models) if cfg.models else None
    for b in baseline["models"]:
        if wanted is not None and b["name"] not in wanted and f"{b['role']}/{b['format']}/{b['precision']}" not in wanted:
            continue
        name = b["name"]
        c = _find(cur_index, b)
        if c is None:
            res.checks.append(Check(name, "present", FAIL, "yes", "missing", "", "the current report has no such model"))
            continue
        drop = 100.0 * (b["accuracy"] - c["accuracy"])
        res.checks.append(Check(name, "accuracy", PASS if drop <= cfg.max_accuracy_drop else FAIL, f"{100 * b['accuracy']:.2f}%",
                                f"{100 * c['accuracy']:.2f}%", f"drop ≤ {cfg.max_accuracy_drop:g} pts", f"{0.0 - drop + 0.0:+.2f} pts"))
        if cfg.min_agreement is not None and c["role"] != "teacher":
            res.checks.append(Check(name, "agreement", PASS if c["agreement"] >= cfg.min_agreement else FAIL, f"{100 * b['agreement']:.2f}%",
                                    f"{100 * c['agreement']:.2f}%", f"≥ {100 * cfg.min_agreement:.2f}%"))
        if b["size_bytes"] > 0:
            growth = c["size_bytes"] / b["size_bytes"] - 1.0
            res.checks.append(Check(name, "size", PASS if growth <= cfg.max_size_growth else FAIL, f"{b['size_bytes']:,} B",
                                    f"{c['size_bytes']:,} B", f"growth ≤ {100 * cfg.max_size_growth:g}%", f"{100 * growth:+.1f}%"))
        res.checks.append(_latency_check(name, b, c, base_ref, cur_ref, cfg))
    for f in cfg.floors or []:
        m = _lookup(current["models"], f["model"])
        if m is None:
            res.checks.append(Check(f["model"], f"floor {f['metric']}", FAIL, "", "missing", "", "no such model in the current report"))
            continue
        v = FLOOR_METRICS[f["metric"]](m)
        ok = ("min" not in f or v >= f["min"]) and ("max" not in f or v <= f["max"])
        limit = " and ".join(s for s in (f"≥ {f['min']:g}" if "min" in f else "", f"≤ {f['max']:g}" if "max" in f else "") if s)
        res.checks.append(Check(m["name"], f"floor {f['metric']}", PASS if ok else FAIL, "", f"{v:g}", limit))
    return res


def _latency_check(name: str, b: dict, c: dict, base_ref: dict | None, cur_ref: dict | None, cfg: GateConfig) -> Check:
    where_b, where_c = b.get("latency_measured_on", "host"), c.get("latency_measured_on", "host")
    if not cfg.absolute_latency:
        if base_ref is None or cur_ref is None:
            return Check(name, "latency", SKIP, detail="no reference model to take ratios against")
        if b is base_ref or (b["name"] == base_ref["name"]):
            return Check(name, "latency", SKIP, detail="the reference of the ratios")
        if where_b != "host" or where_c != "host":
            return Check(name, "latency", SKIP, detail="measured on a device: not comparable with the host reference")
        bv, bs = _latency_series(b, base_ref)
        cv, cs = _latency_series(c, cur_ref)
        unit = "×ref"
    else:
        if b["format"] in BLACK_BOX:
            return Check(name, "latency", SKIP, detail="a black-box teacher's latency is not the model's")
        bv, bs = _latency_series(b, None)
        cv, cs = _latency_series(c, None)
        unit = " ms"
    effect = cv / bv - 1.0 if bv > 0 else 0.0
    limit = f"slowdown ≤ {100 * cfg.max_latency_regression:g}%"
    fmt = (lambda v: f"{v:.3f}{unit}") if unit == "×ref" else (lambda v: f"{v:.4f}{unit}")
    if bs and cs:  # repeated rounds on both sides: significance (all rounds) and effect size (best rounds)
        p = mann_whitney_greater(cs, bs)
        bad = p < cfg.alpha and effect > cfg.max_latency_regression
        return Check(name, "latency", FAIL if bad else PASS, fmt(bv), fmt(cv),
                     f"{limit}, Mann-Whitney p < {cfg.alpha:g}", f"{100 * effect:+.1f}%, p = {p:.3g} ({len(bs)} vs {len(cs)} rounds)")
    return Check(name, "latency", FAIL if effect > cfg.max_latency_regression else PASS, fmt(bv), fmt(cv), limit, f"{100 * effect:+.1f}%")


# --- output -------------------------------------------------------------------------------------------------------
def render_markdown(res: GateResult, current: str, baseline: str) -> str:
    icon = {PASS: "✅", FAIL: "❌", SKIP: "➖"}
    lines = [f"### compress gate: {'PASS' if res.passed else 'FAIL'}", "",
             f"`{current}` against the baseline `{baseline}`; latency compared as {res.latency_mode}"
             + (f" (`{res.reference}`)" if res.reference else "") + ".", "",
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
    t = Table(title=f"compress gate: latency as {res.latency_mode}" + (f" ({res.reference})" if res.reference else ""))
    for col in ("model", "check", "baseline", "current", "limit", "result"):
        t.add_column(col)
    style = {PASS: "green", FAIL: "bold red", SKIP: "dim"}
    for c in res.checks:
        t.add_row(c.model, c.check, c.baseline, c.current, c.limit, f"[{style[c.status]}]{c.status}[/]" + (f" {c.detail}" if c.detail else ""))
    console.print(t)
    console.print(res.summary())


def github_summary(markdown: str) -> str | None:
    """Append to $GITHUB_STEP_SUMMARY when GitHub Actions sets it; returns the path written."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return None
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(markdown + "\n")
    return path
