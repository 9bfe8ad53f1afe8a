"""The bench stage (every variant's accuracy, agreement with the teacher, latency and size: report.json) and the
report stage (report.md, report.html, a device's rows merged in)."""
from __future__ import annotations

from pathlib import Path

from .._io import write_json
from ..run import Run, skip_done


def bench_stage(run: Run, force: bool) -> dict:
    """Measure accuracy, agreement with the teacher, latency, size and parameters of every variant; write report.json."""
    from .report import build_report, load_report
    from .runner_bench import bench_models, preprocessing_time

    if skip_done(run, "bench", force):
        return load_report(run.path("report.json"))
    cfg = run.config.bench
    with run.running("bench"):
        models = bench_models(run, cfg)
        rep = build_report(run, models)
        pre = preprocessing_time(run, cfg)
        if pre is not None:
            rep["preprocessing"] = pre
        write_json(run.path("report.json"), rep)
    run.finish("bench", {"report": "report.json"}, {"models": len(models)})
    return rep


def report_stage(run: Run, merge: str | Path | None = None, *, remote: str | None = None, html: bool | None = None) -> dict:
    """Render report.md from the run's report.json (validated) and return the report; merge folds in a device's report.json
    (remote: the user@host compress bench --remote ran it on, which names the merged rows). html: also write report.html
    (None: only when the run already has one, to keep it in step)."""
    from .._io import write_text
    from .report import load_report, render_markdown

    if merge is not None:
        from ..bundle import merge_device_report

        merge_device_report(run.dir, merge, remote=remote)
    rep = load_report(run.path("report.json"))
    write_text(run.path("report.md"), render_markdown(rep))
    if html is None:
        html = run.path("report.html").exists()
    if html:
        from .html import render_html

        write_text(run.path("report.html"), render_html(rep))
    run.begin("report")
    run.finish("report", {"markdown": "report.md", **({"html": "report.html"} if html else {})}, {})
    return rep
