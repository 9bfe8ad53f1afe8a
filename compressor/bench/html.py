"""report.html: one self-contained page (inline styles, inline SVG, no scripts, nothing fetched from the network) with the
comparison table, the notes, host and target, and an accuracy-vs-latency plot whose Pareto front is drawn as a line."""
from __future__ import annotations

import math
from html import escape

from .report import HEADERS, render_markdown, table_rows

# where a row's latency comes from: its marker shape and legend label
PLACES = {"host": ("circle", "measured on this host"), "device": ("square", "measured on the device"),
          "estimated": ("triangle", "estimated, not measured")}
ROLE_COLOURS = {"teacher": "#7b3294", "student": "#1b7837", "baseline": "#b35806"}
FRONT_COLOURS = {"host": "#2166ac", "device": "#d6604d", "estimated": "#878787"}
# report.md's sentences on the run's checks, shown in the HTML too (taken from render_markdown so the two never disagree)
CHECK_PREFIXES = ("Latency: ", "ONNX export check: ", "INT8 recipe: ", "Kept in float: ", "Teacher queries: ")


def place(m: dict) -> str:
    """Where a row's latency comes from: 'estimated', 'device' (merged from a device's report) or 'host'."""
    if m.get("estimated"):
        return "estimated"
    return "device" if m.get("latency_measured_on", "host") == "target" and m.get("merged_from") else "host"


def pareto_front(models: list[dict]) -> list[str]:
    """Names of the models no other model dominates (at least as fast and as accurate, and strictly better in one of the two),
    fastest first. Latency is p50 ms; rows with equal latency and accuracy are both on the front."""
    pts = [(m["latency_ms"]["p50"], m["accuracy"], m["name"]) for m in models]
    front = [(lat, acc, name) for lat, acc, name in pts
             if not any(ol <= lat and oa >= acc and (ol < lat or oa > acc) for ol, oa, _ in pts)]
    return [name for _, _, name in sorted(front, key=lambda p: (p[0], -p[1]))]


def fronts(models: list[dict]) -> dict[str, list[str]]:
    """A Pareto front per place: a device's latencies are not comparable with the host's, nor estimates with measurements."""
    out = {}
    for p in PLACES:
        group = [m for m in models if place(m) == p]
        if group:
            out[p] = pareto_front(group)
    return out


# --- the plot -------------------------------------------------------------------------------------------------------------
W, H = 820, 460
LEFT, RIGHT, TOP, BOTTOM = 70, 24, 20, 56


def _nice_step(span: float, n: int = 5) -> float:
    raw = span / n if span > 0 else 1.0
    mag = 10 ** math.floor(math.log10(raw))
    return next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)


def _linear_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    step = _nice_step(hi - lo)
    lo, hi = math.floor(lo / step) * step, math.ceil(hi / step) * step
    ticks = [lo + i * step for i in range(int(round((hi - lo) / step)) + 1)]
    return lo, hi, ticks


def _log_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
    decades = int(round(math.log10(hi / lo)))
    mults = (1,) if decades > 4 else (1, 2, 5) if decades > 1 else (1, 2, 3, 5)
    ticks = [lo * 10 ** d * k for d in range(decades + 1) for k in mults if lo * 10 ** d * k <= hi * 1.0001]
    return lo, hi, ticks


def _fmt_ms(v: float) -> str:
    return f"{v:g}" if v >= 0.001 else f"{v:.0e}"


def _marker(shape: str, x: float, y: float, fill: str, stroke: str, extra: str = "") -> str:
    if shape == "square":
        return f'<rect x="{x - 5.5:.1f}" y="{y - 5.5:.1f}" width="11" height="11" fill="{fill}" stroke="{stroke}" stroke-width="2"{extra}/>'
    if shape == "triangle":
        pts = f"{x:.1f},{y - 7:.1f} {x + 6.5:.1f},{y + 5:.1f} {x - 6.5:.1f},{y + 5:.1f}"
        return f'<polygon points="{pts}" fill="{fill}" stroke="{stroke}" stroke-width="2" stroke-dasharray="3 2"{extra}/>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{fill}" stroke="{stroke}" stroke-width="2"{extra}/>'


def render_plot(models: list[dict], front: dict[str, list[str]]) -> str:
    """The accuracy-vs-latency plot as an inline SVG element: one labelled marker per model (class "point")."""
    log, xticks, fx = _latency_axis([m["latency_ms"]["p50"] for m in models])
    yticks, fy = _accuracy_axis([m["accuracy"] * 100 for m in models])

    out = [f'<svg class="plot" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
           f'aria-label="accuracy against p50 latency, one marker per model">',
           f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" fill="#fbfbfb" stroke="#999"/>',
           *_grid(xticks, yticks, fx, fy, log), *_front_paths(models, front, fx, fy)]
    on_front = {n for names in front.values() for n in names}

    def xy(m):
        return fx(m["latency_ms"]["p50"]), fy(m["accuracy"] * 100)

    # boxes already taken (every marker, then each label drawn), to keep labels off markers and other labels
    placed = [(x - 8, y - 8, x + 8, y + 8) for x, y in map(xy, models)]
    for m in sorted(models, key=lambda m: (m["latency_ms"]["p50"], -m["accuracy"])):
        x, y = xy(m)
        out.append(_point(m, x, y, m["name"] in on_front))
        label = m["name"] + (" †" if place(m) == "device" else " ≈" if place(m) == "estimated" else "")
        w = 6.6 * len(label) + 4
        lx, ly = _label_spot(x, y, w, placed)
        placed.append((lx, ly - 11, lx + w, ly + 3))
        out.append(f'<text x="{lx:.1f}" y="{ly:.1f}" class="label">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _latency_axis(lats: list[float]):
    """(log scale?, the ticks, latency ms -> x): a log axis when the latencies span more than a factor 10."""
    log = min(lats) > 0 and max(lats) / min(lats) > 10
    if log:
        x0, x1, xticks = _log_ticks(min(lats), max(lats))
        return log, xticks, lambda v: LEFT + (math.log10(v) - math.log10(x0)) / (math.log10(x1) - math.log10(x0)) * (W - LEFT - RIGHT)
    x0, x1, xticks = _linear_ticks(0.0, max(lats) * 1.05 if max(lats) > 0 else 1.0)
    return log, xticks, lambda v: LEFT + (v - x0) / (x1 - x0) * (W - LEFT - RIGHT)


def _accuracy_axis(accs: list[float]):
    """(the ticks, accuracy % -> y): the accuracies with some margin, within 0..100."""
    pad = max(0.5, (max(accs) - min(accs)) * 0.08)
    y0, y1, yticks = _linear_ticks(max(0.0, min(accs) - pad), min(100.0, max(accs) + pad))
    return yticks, lambda v: TOP + (1 - (v - y0) / (y1 - y0)) * (H - TOP - BOTTOM)


def _grid(xticks: list[float], yticks: list[float], fx, fy, log: bool) -> list[str]:
    """The grid lines, tick labels and axis titles."""
    out = []
    for t in xticks:
        x = fx(t)
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{H - BOTTOM}" stroke="#e3e3e3"/>'
                   f'<text x="{x:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle" class="tick">{_fmt_ms(t)}</text>')
    for t in yticks:
        y = fy(t)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="#e3e3e3"/>'
                   f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{t:g}</text>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2:.0f}" y="{H - 14}" text-anchor="middle" class="axis">p50 latency, ms'
               f'{" (log scale)" if log else ""} — lower is faster</text>')
    out.append(f'<text transform="translate(16 {(TOP + H - BOTTOM) / 2:.0f}) rotate(-90)" text-anchor="middle" class="axis">'
               f'held-out accuracy %</text>')
    return out


def _front_paths(models: list[dict], front: dict[str, list[str]], fx, fy) -> list[str]:
    """Each Pareto front of more than one model as a step line through its models, fastest first."""
    by_name = {m["name"]: m for m in models}
    out = []
    for p, names in front.items():
        pts = [(fx(by_name[n]["latency_ms"]["p50"]), fy(by_name[n]["accuracy"] * 100)) for n in names]
        if len(pts) > 1:
            path = f"M{pts[0][0]:.1f},{pts[0][1]:.1f} " + " ".join(f"H{x:.1f} V{y:.1f}" for x, y in pts[1:])
            out.append(f'<path class="front" d="{path}" fill="none" stroke="{FRONT_COLOURS[p]}" stroke-width="2" stroke-opacity="0.8"/>')
    return out


def _point(m: dict, x: float, y: float, on_front: bool) -> str:
    """A model's marker (filled when on the front) with its tooltip."""
    shape, where = PLACES[place(m)]
    colour = ROLE_COLOURS.get(m["role"], "#333")
    tip = (f"{m['name']}: {m['format']} {m['precision']}, {m['accuracy'] * 100:.2f}% accuracy, "
           f"{m['latency_ms']['p50']:.4g} ms p50, {where}" + (", on the Pareto front" if on_front else ""))
    return (f'<g class="point" data-model="{escape(m["name"])}" data-place="{place(m)}"><title>{escape(tip)}</title>'
            + _marker(shape, x, y, colour if on_front else "#ffffff", colour) + "</g>")


def _label_spot(x: float, y: float, w: float, placed: list[tuple]) -> tuple[float, float]:
    """Where a label w wide goes beside the marker at (x, y): right of the marker, left of it, then below and above, then
    further down: the first spot that is free (of the boxes in placed) and inside the plot."""
    spots = [(x + 10, y + 4), (x - 10 - w, y + 4), (x - w / 2, y + 20), (x - w / 2, y - 11), (x + 10, y + 17), (x + 10, y - 9),
             (x - 10 - w, y + 17), (x - 10 - w, y - 9), *((x + 10, y + 4 + 13 * k) for k in range(2, 6))]
    free = [(sx, sy) for sx, sy in spots if LEFT < sx and sx + w < W - RIGHT and TOP + 11 < sy < H - BOTTOM - 3
            and not any(sx < bx1 and sx + w > bx0 and sy - 11 < by1 and sy + 3 > by0 for bx0, by0, bx1, by1 in placed)]
    return free[0] if free else spots[0] if x + 10 + w < W - RIGHT else spots[1]


def render_legend(models: list[dict], front: dict[str, list[str]]) -> str:
    items = []
    for role in dict.fromkeys(m["role"] for m in models):
        c = ROLE_COLOURS.get(role, "#333")
        items.append(f'<span class="key"><svg width="16" height="16" viewBox="0 0 16 16">{_marker("circle", 8, 8, c, c)}</svg>{escape(role)}</span>')
    for p in dict.fromkeys(place(m) for m in models):
        shape, where = PLACES[p]
        items.append(f'<span class="key"><svg width="16" height="16" viewBox="0 0 16 16">{_marker(shape, 8, 8.5, "#fff", "#333")}</svg>'
                     f'{escape(where)}</span>')
    for p in (p for p, names in front.items() if len(names) > 1):  # a front of one model draws no line
        label = "Pareto front" + (f" ({PLACES[p][1]})" if len(front) > 1 else "")
        items.append(f'<span class="key"><svg width="24" height="16" viewBox="0 0 24 16"><line x1="1" y1="8" x2="23" y2="8" '
                     f'stroke="{FRONT_COLOURS[p]}" stroke-width="2"/></svg>{escape(label)}: filled markers</span>')
    return '<p class="legend">' + "".join(items) + "</p>"


# --- the page -------------------------------------------------------------------------------------------------------------
STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 24px auto; max-width: 1100px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #555; margin: 0 0 12px; }
.callout { border-left: 4px solid #2166ac; background: #eef4fa; padding: 8px 12px; margin: 12px 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 5px 7px; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; vertical-align: bottom; } .table { overflow-x: auto; } th:nth-child(-n+3), td:nth-child(-n+3) { text-align: left; }
tr.front td:first-child { font-weight: 600; } td.model { white-space: normal; min-width: 12em; }
.badge { display: inline-block; font-size: 11px; font-weight: 600; border-radius: 3px; padding: 0 4px; margin-left: 6px; color: #fff; }
.badge.front { background: #2166ac; } .badge.device { background: #d6604d; } .badge.estimated { background: #878787; }
.plot { max-width: 100%; height: auto; } .plot .tick { font-size: 11px; fill: #555; } .plot .axis { font-size: 12px; fill: #333; }
.plot .label { font-size: 11px; fill: #222; }
.legend .key { display: inline-flex; align-items: center; gap: 5px; margin-right: 16px; }
ul.notes li { margin-bottom: 4px; } .small { color: #555; font-size: 13px; }
"""


def render_html(report: dict) -> str:
    """report.html for a (validated) report: self-contained, every text escaped."""
    rep, t, h, d = report, report["target"], report["host"], report["data"]
    models = rep["models"]
    front = fronts(models)
    on_front = {n for names in front.values() for n in names}

    head = "".join(f"<th>{escape(c)}</th>" for c in HEADERS)
    body = []
    for m, row in zip(models, table_rows(rep)):
        p = place(m)
        badges = ((' <span class="badge front" title="Pareto front: no other model is both at least as fast and as accurate">Pareto</span>'
                   if m["name"] in on_front else "")
                  + (' <span class="badge device">device</span>' if p == "device" else "")
                  + (' <span class="badge estimated">estimated</span>' if p == "estimated" else ""))
        cells = [f'<td class="model">{escape(row[0])}{badges}</td>'] + [f"<td>{escape(c)}</td>" for c in row[1:]]
        body.append(f'<tr class="{"front " if m["name"] in on_front else ""}{p}">' + "".join(cells) + "</tr>")

    md_lines = render_markdown(rep).splitlines()
    checks = [ln.replace("`", "") for ln in md_lines if ln.startswith(CHECK_PREFIXES)]
    notes = rep.get("notes", [])[1:]
    versions = ", ".join(f"{k} {v}" for k, v in h.get("versions", {}).items())
    host_line = (f"{h['cpu']}, {h['cpu_count']} cores" + (f", GPU {h['gpu']}" if h.get("gpu") else "")
                 + f"; CPU features {', '.join(h.get('cpu_features', [])) or 'n/a'}" + (f"; {versions}" if versions else "")
                 + (f"; {h['os']} {h.get('machine', '')}".rstrip() if h.get("os") else ""))
    target_line = (f"{t['name']} ({t['kind']}, runtime {t['runtime']}"
                   + (f", INT8 recipe {t['int8_recipe']}" if t.get("int8_recipe") else "") + ")"
                   + (f": {t['description']}" if t.get("description") else ""))
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape('Compression report — target ' + t['name'])}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
        f"<h1>{escape('Compression report — target ' + t['name'])}</h1>",
        f'<p class="meta">{escape(t.get("description", ""))}. Created {escape(rep["created"])} by compressor {escape(rep["tool_version"])}.</p>',
        f'<p class="callout">{escape(t["latency_note"])}</p>',
        f"<p>Data: {d['train_labeled']:,} labeled + {d['train_unlabeled']:,} unlabeled training rows; accuracy on {d['heldout']:,} held-out rows "
        f"({escape(d['heldout_source'])}).</p>",
        "<h2>Accuracy against latency</h2>",
        render_plot(models, front),
        render_legend(models, front),
        '<p class="small">Filled markers and the line: the Pareto front, the models no other model beats on both speed and accuracy'
        + (", drawn separately for each place the latencies come from (they are not comparable across places)" if len(front) > 1 else "")
        + ". † measured on the device, ≈ estimated.</p>",
        "<h2>Models</h2>",
        f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>', *body, "</tbody></table></div>",
        *(f'<p class="small">{escape(c)}</p>' for c in checks),
    ]
    for m in report["models"]:  # --batch-sweep
        if m.get("throughput"):
            parts += [f'<p class="small">Throughput of {escape(m["name"])}: ' + ", ".join(
                f"batch {p['batch']}: {p['items_per_s']:,.0f}/s ({p['p50_ms']:.3f} ms)" for p in m["throughput"]) + ".</p>"]
    if report.get("preprocessing"):
        pre = report["preprocessing"]
        parts += [f'<p class="small">Preprocessing, timed the same way: {pre["latency_ms"]["p50"]:.3f} ms p50 per image ({escape(pre["what"])}).</p>']
    if report.get("estimates"):  # roofline estimates: their own table, never in the measured one or the plot
        est = report["estimates"]
        parts += [f"<h2>Estimated on {escape(est[0]['target'])} (not measured)</h2>",
                  '<p class="small">A roofline from the model\'s layers and the profile\'s GPU dense peak and bandwidth, with a per-layer '
                  "cost calibrated on MLPerf ResNet-50 (AGX Orin; Orin NX predicted within 4%); small models at batch 1 err more.</p>",
                  '<div class="table"><table><thead><tr><th>model</th><th>precision</th><th>estimated ms ≈</th><th>bound</th><th>MMACs</th></tr></thead><tbody>',
                  *(f"<tr><td>{escape(e['name'])}</td><td>{escape(e['precision'])}</td><td>{e['latency_ms']:.3f}</td><td>{escape(e['bound'])}</td>"
                    f"<td>{e['macs'] / 1e6:,.3f}</td></tr>" for e in est),
                  "</tbody></table></div>"]
    if notes:
        parts += ["<h2>Notes</h2>", '<ul class="notes">', *(f"<li>{escape(n)}</li>" for n in notes), "</ul>"]
    parts += ["<h2>Host and target</h2>", f"<p><b>Target:</b> {escape(target_line)}.<br><b>Latency measured on:</b> "
              f"{escape(t['latency_measured_on'])}.<br><b>Host:</b> {escape(host_line)}.</p>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"
