"""report.json (the public contract, validated by a shipped JSON Schema), report.md and the terminal table."""
from __future__ import annotations

import json
from pathlib import Path

from .. import schemas
from ..errors import CompressError
from ..version import __version__
from .host import describe_host

def validate_report(rep: dict, where: str = "report") -> dict:
    """Raise CompressError naming the first place where rep breaks the report schema."""
    return schemas.validate(rep, "report", f"{where} (report schema version 1)")


REPORT_MAX_BYTES = 64 << 20  # reports are kilobytes; a larger file is refused before it is read


def load_report(path: str | Path) -> dict:
    """Read and validate a report.json."""
    from .._io import read_regular_file

    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise CompressError(f"{p} does not exist", hint="run 'compress bench' first")
    # a folder, a FIFO (would hang), /dev/zero (would fill the memory), or larger than a report can be
    raw = read_regular_file(p, "", REPORT_MAX_BYTES, hint="pass a report.json written by 'compress bench'")
    try:
        rep = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CompressError(f"{p} is nested too deeply to be a report.json") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CompressError(f"{p} is not readable JSON: {str(exc)[:200]}") from None
    try:
        return validate_report(rep, str(p))
    except RecursionError:
        raise CompressError(f"{p} is nested too deeply to be a report.json") from None


def build_report(run, models: list[dict]) -> dict:
    """Assemble the report for a run from its manifest and the benched models."""
    target, host = run.target, describe_host()
    on_host = bool(target.get("is_host"))
    note = _latency_note(target, host, on_host)
    stages = run.manifest["stages"]
    distill, quant = stages["distill"]["result"], stages["quantize"]["result"]
    int8 = next((m for m in models if m["precision"] == "int8"), None)
    fp32 = next((m for m in models if m["format"] == "onnx" and m["precision"] == "fp32"), None)
    notes = [note, *_quantize_notes(quant, int8, fp32), *_exporter_notes(stages["export"]["result"]["check"]),
             *_int8_accuracy_notes(quant, int8), *_measurement_notes(host, models)]
    rep = _report_body(run, models, host, note, notes, on_host)
    est = estimates(run, models)
    if est:  # never mixed with the measured rows
        rep["estimates"] = est
        notes.append(f"Latencies on {target['name']} are estimated, not measured (roofline; see 'Estimated' below): "
                     "measure them with 'compress bundle' on the device or 'compress bench --remote'.")
    _add_distill_sections(rep, distill)
    return validate_report(rep)


def _latency_note(target: dict, host: dict, on_host: bool) -> str:
    """The report's first note: where the latencies were measured, and what they mean for the target."""
    where = f"{host['cpu']} ({host['cpu_count']} cores{', GPU ' + host['gpu'] if host['gpu'] else ''})"
    return (f"Latencies were measured on this host: {where}." if on_host else
            f"Latencies were measured on this host ({where}) with ONNX Runtime / PyTorch on the CPU, NOT on the target "
            f"{target['description']}; they show relative speed only.")


def _quantize_notes(quant: dict, int8: dict | None, fp32: dict | None) -> list[str]:
    """Notes on the INT8 model's speed and on what its recipe left in float."""
    notes = []
    if int8 and fp32 and int8["latency_ms"]["p50"] > fp32["latency_ms"]["p50"]:
        notes.append(f"INT8 ({quant['recipe']}) is slower than FP32 on this host for this model "
                     f"({int8['latency_ms']['p50']:.3f} vs {fp32['latency_ms']['p50']:.3f} ms p50): ship FP32 for this CPU.")
    if quant.get("ops_float") or quant.get("fallback"):  # ops the INT8 recipe could not quantize stay float: say which
        left = ", ".join(f"{op} ×{n}" for op, n in (quant.get("ops_float") or {}).items())
        notes.append(f"INT8 ({quant['recipe']}) leaves some operations in float" + (f": {left}" if left else "")
                     + (f"; {quant['fallback']}" if quant.get("fallback") else "") + ".")
    if quant.get("kept_float"):  # the accuracy-aware search kept nodes in float: which, and what they cost
        cost = quant.get("kept_float_cost_ms")
        notes.append(f"INT8 kept {len(quant['kept_float'])} node(s) in float to stay within {quant['int8_tolerance']:g} point(s) of FP32: "
                     + ", ".join(f"{k['node']} ({k['op']})" for k in quant["kept_float"])
                     + (f"; they cost {cost:+.3f} ms p50 against the fully quantized model (batch 1, 1 thread)" if cost is not None else "") + ".")
    return notes


def _exporter_notes(export_check: dict) -> list[str]:
    """A note when the first exporter in the chain failed: which one made the graph, and why the others were not used."""
    if not export_check.get("exporters_rejected"):
        return []
    from ..export.onnx_io import EXPORTER_LABELS

    why = "; ".join(f"the {EXPORTER_LABELS.get(r['exporter'], r['exporter'])} was not used: {r['reason']}" for r in export_check["exporters_rejected"])
    return [f"The ONNX graph was made by the {EXPORTER_LABELS.get(export_check.get('exporter'), export_check.get('exporter'))} "
            f"(opset {export_check.get('opset')}); {why}."]


def _int8_accuracy_notes(quant: dict, int8: dict | None) -> list[str]:
    """Notes on how the INT8 accuracy was measured and reached (emulated Q/DQ, fake-quantization fine-tuning, tolerance missed)."""
    notes = []
    if int8 and int8.get("accuracy_note"):
        notes.append("INT8 accuracy and agreement of the TensorRT graph were computed with its Q/DQ arithmetic emulated as TensorRT "
                     "computes it (ONNX Runtime with Q/DQ fusion off), not with this CPU's integer kernels; its latency here is ONNX Runtime's.")
    if quant.get("qat") and quant["qat"].get("used"):
        notes.append(f"INT8 comes from the student fine-tuned with fake quantization against the teacher ({quant['qat']['steps']} steps): "
                     "plain post-training quantization missed the tolerance.")
    if "within_tolerance" in quant and not quant["within_tolerance"]:
        notes.append(f"INT8 loses {quant['drop_points']:.2f} points of {quant['validation']['metric']} on the validation split, more than the "
                     f"{quant['int8_tolerance']:g} allowed, even after the accuracy-aware search: ship FP32 (or FP16) where accuracy matters.")
    return notes


def _measurement_notes(host: dict, models: list[dict]) -> list[str]:
    """Notes on latencies that may be off: a busy machine, noisy measurements."""
    notes = []
    if host.get("load_average_1m") and host["cpu_count"] and host["load_average_1m"] > host["cpu_count"]:
        notes.append(f"The machine was busy while benchmarking (load average {host['load_average_1m']} on {host['cpu_count']} cores): "
                     "latencies are likely inflated; rerun 'compress bench RUN --force' on a quiet machine.")
    if any(m["latency_ms"].get("noisy") for m in models):
        notes.append("Some latency measurements were noisy (coefficient of variation above 15%); rerun 'compress bench' on a quiet machine.")
    return notes


QUANTIZE_CHECK_KEYS = ("recipe", "requested", "agreement_with_fp32", "calibration_rows", "calibrate_method", "trials",
                       "int8_tolerance", "drop_points", "within_tolerance", "validation", "kept_float", "kept_float_cost_ms", "qat")
DISTILL_CHECK_KEYS = ("val_accuracy", "best_step", "steps", "seconds", "train_rows")


def _report_body(run, models: list[dict], host: dict, note: str, notes: list[str], on_host: bool) -> dict:
    """The report's fields from the run's manifest and config, the benched models and the notes (the list itself, still growing)."""
    from ..run import now

    target, cfg = run.target, run.config
    stages = run.manifest["stages"]
    distill, quant = stages["distill"]["result"], stages["quantize"]["result"]
    teacher = run.manifest["inputs"]["teacher"]
    return {
        "schema_version": 1,
        "created": now(),
        "tool_version": __version__,
        "target": {"name": target["name"], "description": target["description"], "kind": target["kind"],
                   "runtime": target["runtime"]["name"], "int8_recipe": quant["recipe"],
                   "latency_measured_on": "target" if on_host else "host", "latency_note": note},
        "host": host,
        "data": distill["data"],
        "configs": {"data": cfg.data.to_dict(), "distill": cfg.distill.to_dict(), "export": cfg.export.to_dict(),
                    "quantize": cfg.quantize.to_dict(), "bench": cfg.bench.to_dict()},
        "teacher": {"path": teacher["path"], "sha256": teacher["sha256"], "format": distill["teacher_format"]},
        "models": models,
        "checks": {
            "export": stages["export"]["result"]["check"],
            "quantize": {k: quant[k] for k in QUANTIZE_CHECK_KEYS if k in quant},
            "distill": {k: {kk: v[kk] for kk in DISTILL_CHECK_KEYS} for k, v in distill.items() if k in ("student", "baseline")},
        },
        "notes": notes,
    }


def _add_distill_sections(rep: dict, distill: dict) -> None:
    """What the distill stage adds to the report: a black-box teacher's queries, the stage's own notes, the --search trials."""
    notes = rep["notes"]
    if distill.get("teacher_queries"):  # a black-box flow: the rows and calls the teacher was asked for
        rep["checks"]["distill"]["teacher_queries"] = {k: v for k, v in distill["teacher_queries"].items() if k in QUERY_KEYS}
    held = distill.get("teacher_heldout_queries")  # a black box's held-out accuracy and latency, measured by distill (api._save_code_free)
    if isinstance(held, dict) and held.get("calls"):
        notes.append(f"The teacher is a black box ({distill.get('teacher_format')}): the distill stage also asked it about {held['rows']:,} rows "
                     f"in {held['calls']:,} calls for its held-out accuracy and latency (later stages never query it).")
    notes.extend(n for n in distill.get("notes") or [] if isinstance(n, str))  # the distill stage's own (how the teacher's outputs were read)
    if distill.get("auto"):  # --student auto: the candidates, their sizes and scores, and which won
        rep["student_choice"] = {k: v for k, v in distill["auto"].items() if k in CHOICE_KEYS}
    if distill.get("search"):  # --search: every trial and the settings the student was trained with
        rep["search"] = {k: v for k, v in distill["search"].items() if k in SEARCH_KEYS}
        best = rep["search"]["best"]
        notes.append(f"configs.distill holds the settings asked for; --search trained the student with trial {best['number']}'s: "
                     + ", ".join(f"{k}={_fmt_param(v)}" for k, v in best["params"].items()) + ".")


def estimates(run, models: list[dict]) -> list[dict]:
    """Roofline latency estimates of the run's ONNX student flavours on a target this host is not (labelled
    estimated; kept out of the measured table)."""
    from .roofline import estimate, roofline_figures

    target = run.target
    if target.get("is_host"):
        return []
    out = []
    fp32 = run.path(run.stage("export")["outputs"]["onnx_fp32"])
    for m in models:
        if m["format"] != "onnx" or m["role"] != "student" or m.get("latency_measured_on", "host") != "host":
            continue
        figures = roofline_figures(target, m["precision"])
        if figures is None:
            continue
        peak, bw = figures["peak_tops"], figures["bandwidth_gbps"]
        e = estimate(fp32, figures, m["precision"], batch=m.get("batch_size", 1))
        out.append({"name": m["name"], "target": target["name"], "precision": m["precision"], "latency_ms": e["latency_ms"],
                    "bound": e["bound"], "macs": e["macs"], "method": "roofline", "estimated": True,
                    "peak": peak, "bandwidth_gbps": bw, "layer_overhead_us": e["layer_overhead_us"]})
    return out


QUERY_KEYS = ("output", "budget", "strategy", "pool_rows", "rows", "calls", "rows_per_call", "loss", "rounds")


def render_queries(q: dict) -> str:
    """report.md's line on how much a black-box teacher was asked."""
    n = len(q.get("rounds", []))
    line = f"Teacher queries: {q['rows']:,} rows in {q['calls']:,} call{'' if q['calls'] == 1 else 's'}"
    line += f" over {n} rounds" if n > 1 else ""
    line += f" (budget {q['budget']:,} of {q.get('pool_rows', 0):,} pool rows)" if q.get("budget") else " (every pool row once)"
    line += f"; the teacher answers {q['output']}"
    if n > 1:
        line += f"; rounds after the first asked about the rows the student was least sure of ({q['strategy']})"
    return line + "."


SEARCH_KEYS = ("n_trials", "steps_per_trial", "scored_on", "val_rows", "sampler", "pruner", "seconds", "best", "trials")


def _fmt_param(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


CHOICE_KEYS = ("budget_text", "limits", "teacher_params", "teacher_macs", "latency", "steps_per_candidate", "candidates", "skipped", "winner")


def _count(v) -> str:
    from ..models.budget import human

    return "-" if v is None else human(v)


def render_choice(c: dict) -> list[str]:
    """report.md's section on --student auto: each candidate's size, latency and validation accuracy (the winner in bold)."""
    lat = c.get("latency")
    lines = ["", "## Student choice", "",
             f"Budget {c['budget_text']}: " + ", ".join(f"{k} ≤ {v:g} ms" if k == "latency_ms" else f"{k} ≤ {_count(v)}" for k, v in (c.get("limits") or {}).items())
             + f" (teacher: {_count(c.get('teacher_params'))} params, {_count(c.get('teacher_macs'))} MACs per row). "
             f"Each candidate was distilled for {c.get('steps_per_candidate', '?')} steps and scored on the validation split; "
             f"the winner was then trained in full." + (f" Latency: {lat}." if lat else ""), "",
             "| candidate | kind | params | MACs | latency ms | val accuracy % | seconds | note |", "|---|---|---|---|---|---|---|---|"]
    for r in c["candidates"]:
        acc = "-" if r.get("val_accuracy") is None else f"{r['val_accuracy'] * 100:.2f}"
        latency = "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.3f}"
        cells = [r["name"], r["kind"], _count(r.get("params")), _count(r.get("macs")), latency, acc, f"{r.get('seconds', 0):.1f}", r.get("note") or ""]
        if r.get("won"):
            cells = [f"**{x}**" if x else x for x in cells]
        lines.append("| " + " | ".join(str(x).replace("|", "/") for x in cells) + " |")
    if c.get("skipped"):
        lines += [""] + [f"Not tried: {s}." for s in c["skipped"]]
    return lines


def render_search(s: dict) -> list[str]:
    """report.md's table of search trials (the best one in bold)."""
    names = list(s["best"]["params"])
    lines = ["", "## Hyper-parameter search", "",
             f"{len(s['trials'])} trials of {s.get('steps_per_trial', '?')} steps, scored on {s.get('val_rows', '?')} validation rows "
             f"carved out of the training data (never the held-out set); sampler: {s.get('sampler', '?')}. "
             f"The student was then trained for the full budget with trial {s['best']['number']}'s settings.", "",
             "| trial | " + " | ".join(names) + " | val accuracy % | seconds | state |",
             "|" + "|".join("---" for _ in range(len(names) + 4)) + "|"]
    for t in s["trials"]:
        acc = f"{t['val_accuracy'] * 100:.2f}" if t.get("val_accuracy") is not None else "-"
        cells = [str(t["number"]), *(_fmt_param(t["params"].get(n)) for n in names), acc, f"{t.get('seconds', 0):.1f}", t["state"]]
        if t["number"] == s["best"]["number"]:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def table_rows(rep: dict, runtime: bool = True) -> list[list[str]]:
    """The comparison table's cells, one row of strings per model (columns as HEADERS; without "runtime" if not runtime)."""
    teacher = next((m for m in rep["models"] if m["role"] == "teacher"), rep["models"][0])
    rows = []
    for m in rep["models"]:
        lat = m["latency_ms"]
        # a row measured on the device (merged from its report) is not compared with the teacher's host latency
        same_machine = m.get("latency_measured_on", "host") == teacher.get("latency_measured_on", "host")
        rows.append([
            m["name"], f"{m['format']} {m['precision']}", *([m["runtime"]] if runtime else []), f"{m['accuracy'] * 100:.2f}",
            f"{m['agreement'] * 100:.2f}", f"{lat['p50']:.3f}", f"{lat['p99']:.3f}",
            f"{m['params']:,}", f"{m['size_bytes'] / 1024:.1f}", f"{teacher['latency_ms']['p50'] / lat['p50']:.2f}x" if lat["p50"] and same_machine else "-",
        ])
    return rows


HEADERS = ["model", "format", "runtime", "accuracy %", "agrees w/ teacher %", "p50 ms", "p99 ms", "params", "size KiB", "speed vs teacher"]


def _render_checks(rep: dict) -> list[str]:
    """report.md's lines under the latency notes: the models' sizes and what the export and quantize stages checked."""
    lines = []
    sized = [m for m in rep["models"] if isinstance(m.get("macs"), int) and m["name"] in ("teacher", "student")]
    if sized:
        lines += ["", "Size per row (multiply-accumulates counted with torch.utils.flop_counter"
                  + ("; an ONNX teacher's from its graph's shapes" if rep["models"][0].get("format") == "onnx" else "") + "): "
                  + "; ".join(f"{m['name']} {m['params']:,} params, {m['macs']:,} MACs" for m in sized) + "."]
    checks = rep.get("checks", {})
    if "export" in checks:
        e = checks["export"]
        lines += [f"ONNX export check: max |ONNX − PyTorch| = {e['max_abs_diff']:.2e} (tolerance {e['atol']:.0e}), "
                  f"argmax agreement {e['agreement'] * 100:.2f}% on {e['rows']} held-out rows, opset {e['opset']}."]
    if "quantize" in checks:
        q = checks["quantize"]
        line = (f"INT8 recipe: {q['recipe']} (asked: {q['requested']}), calibrated on {q['calibration_rows']} training rows "
                f"({q['calibrate_method']}); agrees with FP32 on {q['agreement_with_fp32'] * 100:.2f}% of unseen training rows")
        if q.get("validation"):
            v = q["validation"]
            line += (f"; {v['metric']} {v['int8'] * 100:.2f}% vs FP32 {v['fp32'] * 100:.2f}% on {v['rows']} validation rows "
                     f"(tolerance {q['int8_tolerance']:g} point{'' if q['int8_tolerance'] == 1 else 's'})")
        lines += [line + "."]
        if q.get("kept_float"):
            lines += ["Kept in float: " + ", ".join(f"`{k['node']}` ({k['op']})" for k in q["kept_float"]) + "."]
    if checks.get("distill", {}).get("teacher_queries"):
        lines += [render_queries(checks["distill"]["teacher_queries"])]
    return lines


def render_markdown(rep: dict) -> str:
    t, h, d = rep["target"], rep["host"], rep["data"]
    lines = [
        f"# Compression report — target {t['name']}",
        "",
        f"{t.get('description', '')}. Created {rep['created']} by compressor {rep['tool_version']}.",
        "",
        f"> {t['latency_note']}",
        "",
        f"Data: {d['train_labeled']} labeled + {d['train_unlabeled']} unlabeled training rows; "
        f"accuracy on {d['heldout']} held-out rows ({d['heldout_source']}).",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" for _ in HEADERS) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rep)]
    lat = rep["models"][0]["latency_ms"]
    threads = rep["models"][0].get("threads", "?")
    rounds = lat.get("rounds")
    lines += ["", f"Latency: batch {rep['models'][0].get('batch_size', 1)}, {threads} thread{'' if threads == 1 else 's'}, "
              f"p50/p99 over ≥{lat.get('runs', '?')} runs after warm-up"
              + (f", in {rounds} interleaved rounds per model (p50: the median round; a spread of rounds over 5% is flagged noisy)." if rounds else ".")]
    if rep.get("preprocessing"):
        pre = rep["preprocessing"]
        lines += [f"Preprocessing, timed the same way: {pre['latency_ms']['p50']:.3f} ms p50 per image ({pre['what']}); "
                  "the application pays it on top of the model's latency."]
    sweep = [m for m in rep["models"] if m.get("throughput")]
    if sweep:
        batches = [p["batch"] for p in sweep[0]["throughput"]]
        lines += ["", "Throughput (items/s, batch sweep; p50 ms in brackets):", "",
                  "| model | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
        for m in sweep:
            lines.append(f"| {m['name']} | " + " | ".join(f"{p['items_per_s']:,.0f} ({p['p50_ms']:.3f})" for p in m["throughput"]) + " |")
    if rep.get("estimates"):
        lines += ["", f"**Estimated** on {rep['estimates'][0]['target']} (not measured: a roofline from the model's layers and the profile's "
                  "peak throughput and bandwidth, calibrated on MLPerf ResNet-50; error ±6% on the check in benchmarks/results/roofline.md, "
                  "more on small models):", "", "| model | precision | estimated ms | bound | MMACs |", "|---|---|---|---|---|"]
        for e in rep["estimates"]:
            lines.append(f"| {e['name']} | {e['precision']} | {e['latency_ms']:.3f} | {e['bound']} | {e['macs'] / 1e6:,.3f} |")
    lines += _render_checks(rep)
    if rep.get("student_choice"):
        lines += render_choice(rep["student_choice"])
    if rep.get("search"):
        lines += render_search(rep["search"])
    lines += ["", f"Host: {h['cpu']}, {h['cpu_count']} cores, features {', '.join(h.get('cpu_features', [])) or 'n/a'}; "
              + ", ".join(f"{k} {v}" for k, v in h["versions"].items()) + "."]
    for n in rep.get("notes", [])[1:]:
        lines += ["", f"Note: {n}"]
    return "\n".join(lines) + "\n"


def print_table(rep: dict, console=None) -> None:
    """The comparison table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console(stderr=False)
        if not console.is_terminal:
            console = Console(width=120)
    from ..errors import rich_text

    # every string from the report is data: escaped for Rich's markup and stripped of terminal control characters
    table = Table(title=f"target {rich_text(rep['target']['name'])}", caption=rich_text(rep["target"]["latency_note"]))
    for i, h in enumerate(["model", "format", "acc %", "agree %", "p50 ms", "p99 ms", "params", "KiB", "vs teacher"]):
        table.add_column(h, justify="left" if i < 2 else "right")
    for r in table_rows(rep, runtime=False):
        table.add_row(*(rich_text(c) for c in r))
    console.print(table)
    for n in rep.get("notes", [])[1:]:
        console.print(f"[yellow]note:[/] {rich_text(n)}")
