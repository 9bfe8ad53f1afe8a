"""The public entry points: one function per stage, each taking an open Run or a run folder and one config dataclass,
plus compress() for the whole pipeline. Each stage's work lives in its own module (distill/stage.py,
export/stage.py, export/quantize_stage.py, bench/stage.py, bundle.py, remote.py, gate.py); this module holds the
locking and the hand-over between them. The CLI only parses arguments and calls these."""
from __future__ import annotations

import functools
from pathlib import Path

from .config import BenchConfig, CompressConfig, ExportConfig, QuantizeConfig
from .log import say
from .run import Run, open_stage

RunOrDir = "Run | str | Path"


def _locked(fn):
    """Hold the run folder's lock (compressor.ownership.run_lock) for the whole stage: a second writer is refused."""
    @functools.wraps(fn)
    def wrapper(run_dir, *args, **kw):
        from .ownership import run_lock

        with run_lock(run_dir.dir if isinstance(run_dir, Run) else run_dir):
            return fn(run_dir, *args, **kw)
    return wrapper


def claim_out(cfg: CompressConfig, out: str | Path | None) -> Path:
    """--out (or a new runs/<timestamp>) as this run's folder: new, empty, or a run folder already; never the data's."""
    from .distill.stage import claim_out as claim

    return claim(cfg, out)


# ---------------------------------------------------------------------------------------------
def distill(cfg: CompressConfig, out: str | Path | None = None, *, force: bool = False, resume: bool = False) -> Run:
    """Train the student from the teacher (and the labels-only baseline when cfg.distill.baseline); returns the open Run."""
    from .distill.stage import distill_stage
    from .ownership import run_lock

    path = claim_out(cfg, out)
    with run_lock(path):
        return distill_stage(cfg, path, force, resume)


@_locked
def export(run_dir: RunOrDir, config: ExportConfig | None = None, *, force: bool = False, trust: bool = False) -> Run:
    """Export the trained student to ONNX FP32, simplify it (onnxslim), and check every graph against PyTorch."""
    from .export.stage import export_stage

    return export_stage(open_stage(run_dir, "export", config, trust), force)


@_locked
def quantize(run_dir: RunOrDir, config: QuantizeConfig | None = None, *, force: bool = False, trust: bool = False) -> Run:
    """INT8 (and, where the target takes it, FP16) flavours of the ONNX student: every candidate recipe calibrated on the
    user's rows, judged on a validation split and timed on this CPU; the fastest within --int8-tolerance wins (with
    nodes kept in float, or quantization-aware distillation, when none is within it)."""
    from .export.quantize_stage import quantize_stage

    return quantize_stage(open_stage(run_dir, "quantize", config, trust), force)


@_locked
def bench(run_dir: RunOrDir, config: BenchConfig | None = None, *, force: bool = False, trust: bool = False) -> dict:
    """Measure accuracy, agreement with the teacher, latency, size and parameters of every variant; write report.json."""
    from .bench.stage import bench_stage

    return bench_stage(open_stage(run_dir, "bench", config, trust), force)


@_locked
def report(run_dir: RunOrDir, merge: str | Path | None = None, *, remote: str | None = None, html: bool | None = None) -> dict:
    """Render report.md from the run's report.json (validated) and return the report; merge folds in a device's report.json
    (remote: the user@host compress bench --remote ran it on, which names the merged rows). html: also write report.html
    (None: only when the run already has one, to keep it in step)."""
    from .bench.stage import report_stage

    return report_stage(open_stage(run_dir, "report"), merge, remote=remote, html=html)


@_locked
def remote_bench(run_dir: RunOrDir, host: str, **kw) -> dict:
    """Bench the run's exported models on another machine over SSH (compressor.remote) and merge its rows into the report."""
    from .remote import remote_bench as bench_on_host

    run = open_stage(run_dir, "report")
    return report(run, merge=bench_on_host(run, host, **kw), remote=host)


@_locked
def bundle(run_dir: RunOrDir, out: str | Path | None = None, *, force: bool = False) -> dict:
    """Write the Jetson deploy bundle (ONNX files, manifest, build_engine.sh, run_on_device.py, held-out rows) and its .tar.gz."""
    from .bundle import make_bundle

    info = make_bundle(open_stage(run_dir, "bundle"), out, force=force)
    say(f"bundle: {info['dir']} and {info['tarball']}")
    return info


def gate(current: str | Path, baseline: str | Path, config=None):
    """Compare a run (or report.json) with a baseline (bundle, run or report.json): the baseline's models are re-timed
    here beside the current ones where both sides have their files (compressor.gate); returns the GateResult."""
    from .config import GateConfig
    from .gate import compare

    return compare(current, baseline, config or GateConfig())


# ---------------------------------------------------------------------------------------------
def compress(cfg: CompressConfig, out: str | Path | None = None, *, force: bool = False, resume: bool = False) -> dict:
    """The whole pipeline: distill, export, quantize, bench, report; returns the report. The run is opened once and
    handed from stage to stage, so the teacher and the data are loaded once."""
    from .ownership import run_lock

    path = claim_out(cfg, out)
    with run_lock(path):  # one lock over every stage: no other process writes between them
        run = distill(cfg, path, force=force, resume=resume)
        run.end_live()  # the later stages read the run as a later command would (see Run.end_live)
        # a forced or redone distill makes the later stages stale through their fingerprints
        # trust=True: the code the run names (a student factory, a --teacher-arch) is what this call was given; it runs
        # only where distill could not save a code-free copy (a black-box teacher never runs after distill)
        export(run, force=force, trust=True)
        quantize(run, force=force, trust=True)
        rep = bench(run, force=force, trust=True)
        report(run, html=True)
    return rep


# --- what the `compress` commands call besides the stages (the CLI parses, calls these, prints) -----------------------
def run_config(run_dir: Run | str | Path) -> CompressConfig:
    """The config a run folder was set up with: what a later stage's flags change."""
    return (run_dir if isinstance(run_dir, Run) else Run.open(run_dir)).config


def gate_ci(current: str | Path, baseline: str | Path, *, show=None, **options):
    """`compress gate` (compressor.gate.run_gate): the inputs checked, the comparison (show(result) when given), the
    --junit/--markdown/$GITHUB_STEP_SUMMARY summaries and --update-baseline; returns the GateOutcome, whose exit_code is 0
    (pass, or a baseline written) or 1 (a regression). options: config_path, floors, junit, markdown, update_baseline,
    and GateConfig thresholds over the gate.toml's."""
    from .gate import run_gate

    return run_gate(current, baseline, show=show, **options)


def print_gate_table(res, console=None) -> None:
    """A GateResult as a table on the terminal, with its one-line verdict."""
    from .gate import print_table

    print_table(res, console)


def print_report(rep: dict, console=None) -> None:
    """A report's comparison table on the terminal."""
    from .bench.report import print_table

    print_table(rep, console)


def print_targets(console=None) -> None:
    """Every built-in device profile as a table on the terminal."""
    from .targets import print_table

    print_table(console)


def show_target(name: str, *, text: bool = False) -> tuple[str, list[str]]:
    """One device profile (a name, an alias or a .toml path) as JSON, or with text=True as a readable view with every
    figure's source; and the warnings that go with it on this host."""
    import json

    from .targets import get_target, profile_text, profile_warnings

    profile = get_target(name)
    warnings = profile_warnings(profile)
    return (profile_text(profile) if text else json.dumps(profile, indent=2)), warnings
