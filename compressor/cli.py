"""The `compress` command: argument parsing only; every action is a call into compressor.api.
Heavy libraries (torch, onnxruntime) are imported only when a command runs, so --help is fast."""
from __future__ import annotations

import logging
import math
import shlex
import signal
import sys
import traceback
from pathlib import Path

import click

from .config import BenchConfig, CompressConfig, DataConfig, DistillConfig, ExportConfig, GateConfig, QuantizeConfig
from .errors import EXIT_BUG, EXIT_GATE_BUG, EXIT_INTERRUPTED, CompressError, printable

_BUG_EXIT = EXIT_BUG  # the exit code of an unexpected exception; compress gate raises it to EXIT_GATE_BUG

log = logging.getLogger("compressor")
STAGE_COMMANDS = ("distill", "export", "quantize", "bench", "report", "bundle", "targets", "run")


class _DefaultToRun(click.Group):
    """`compress --teacher ...` means `compress run --teacher ...`: the pipeline is the default command."""

    def parse_args(self, ctx, args):
        # group flags (--debug, --quiet) may come first: `compress --debug --teacher ...`, `compress -q targets`
        flags = {o for p in self.params if getattr(p, "is_flag", False) for o in p.opts}
        i = 0
        while i < len(args) and args[i] in flags:
            i += 1
        head, rest = args[:i], args[i:]
        if rest and rest[0] not in self.commands and rest[0] not in ("--help", "-h", "--version"):
            args = [*head, "run", *rest]
        elif not rest:
            args = [*head, "run"]
        return super().parse_args(ctx, args)


class _PrintableFormatter(logging.Formatter):
    """Console messages carry paths and names from files: their control characters are shown, never sent to the terminal."""

    def format(self, record):
        return printable(super().format(record))


def _setup_logging(quiet: bool, debug: bool) -> None:
    log.setLevel(logging.DEBUG)
    if not any(getattr(h, "_compress_console", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h._compress_console = True
        h.setFormatter(_PrintableFormatter("%(message)s"))
        log.addHandler(h)
    for h in log.handlers:
        if getattr(h, "_compress_console", False):
            h.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)


class _RunLog(logging.FileHandler):
    """The run's compress.log; a failing write (disk full) stops the log with one warning, never a traceback a line."""

    def handleError(self, record):
        log.removeHandler(self)
        click.echo(f"warning: cannot write {self.baseFilename} any more ({sys.exc_info()[1]}); the console shows everything", err=True)


def _log_to(run_dir: Path) -> None:
    """Also keep a full log (tracebacks included) in the run directory."""
    from ._io import is_writer

    if not is_writer():  # under torchrun only rank 0 keeps the log, like every other file
        return
    from .ownership import check_no_links_out, owns

    path = Path(run_dir) / "compress.log"
    if not owns(path.parent):
        return
    check_no_links_out(path.parent)  # never append to a link, a FIFO or a hard link to someone's file
    if any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in log.handlers):
        return
    fh = _RunLog(path, encoding="utf-8", errors="backslashreplace")  # a non-UTF-8 path in a message must not break logging
    fh.setLevel(logging.DEBUG)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(fh)


class _Finite(click.FloatRange):
    """click.FloatRange that also refuses nan and inf: click lets nan through every bound and inf through a minimum,
    and a non-finite value would only fail later (a config is JSON without NaN) as an internal error."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


# sane caps: a value beyond them is a typo, and would otherwise fail deep inside a library (int32 thread counts,
# tensor sizes) as an internal error, or run for ever
SEED_MAX = 2**32 - 1  # numpy and torch seeds; negative seeds are refused by numpy
IMAGE_SIDE_MAX = 16384
BATCH_MAX = 1 << 20
STEPS_MAX = 10**9
THREADS_MAX = 1024


def _q(path) -> str:
    """A path as the shell reads it back: printed hints are pasted into shells."""
    return shlex.quote(str(path))


def _list(value: str | None, kind=float, n: int | None = None, flag: str = "", lo=None, hi=None):
    if value is None:
        return None
    try:
        out = [kind(v) for v in value.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}", param_hint=flag) from None
    if n is not None and len(out) != n:
        raise click.BadParameter(f"expected {n} values, got {value!r}", param_hint=flag)
    if not out:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}", param_hint=flag)
    for v in out:
        if not math.isfinite(v):
            raise click.BadParameter(f"{v} in {value!r} is not a finite number", param_hint=flag)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise click.BadParameter(f"{v} in {value!r} is not in {lo if lo is not None else ''}..{hi if hi is not None else ''}", param_hint=flag)
    return out


def _check_image_size(ctx, param, value):
    """HxW, each side 1..IMAGE_SIDE_MAX (checked at parse time; the value stays the text)."""
    _list(value, int, 2, "--image-size", lo=1, hi=IMAGE_SIDE_MAX)
    return value


def _check_norm(ctx, param, value):
    """--mean/--std: 1 to 3 finite values (one per channel, or one for all); std > 0."""
    flag = "--" + param.name
    vals = _list(value, float, flag=flag)
    if vals is None:
        return None
    if len(vals) > 3:
        raise click.BadParameter(f"expected 1 value (every channel) or 1 per channel (at most 3), got {len(vals)}", ctx=ctx, param=param)
    if param.name == "std" and any(v <= 0 for v in vals):
        raise click.BadParameter(f"every std must be > 0 (pixels are divided by it), got {value!r}", ctx=ctx, param=param)
    return value


def _check_norm_channels(kw: dict) -> None:
    """--mean/--std against --channels and each other, where both are known."""
    counts = {f"--{k}": len(_list(kw[k])) for k in ("mean", "std") if kw[k] is not None}
    if kw["channels"] is not None:
        for flag, n in counts.items():
            if n not in (1, kw["channels"]):
                raise click.BadParameter(f"{n} values for --channels {kw['channels']}; give 1 or {kw['channels']}", param_hint=flag)
    if len(counts) == 2 and 1 not in counts.values() and len(set(counts.values())) > 1:
        raise click.BadParameter(f"--mean has {counts['--mean']} values but --std has {counts['--std']}; give one per channel to both", param_hint="--std")


def _check_teacher_output(ctx, param, value):
    if value is None:
        return None
    from .distill.blackbox import parse_teacher_output

    try:
        parse_teacher_output(value)
    except CompressError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value.strip().lower()


def pipeline_options(fn):
    """Options shared by the full pipeline and `compress distill` (Polygraphy-style argument groups)."""
    opts = [
        click.option("--teacher", type=str, help="Trained model: TorchScript, torch.export .pt2, ONNX, or a state dict (with --teacher-arch); or a black box: file.py:fn / package.module:fn, a Python function from a numpy batch to a numpy answer. Default: the built-in demo teacher."),
        click.option("--teacher-arch", type=str, help="file.py:factory (or package.module:factory) building the module for a state-dict teacher."),
        click.option("--teacher-cmd", type=str, help="A black-box teacher as a command, e.g. \"python ask_api.py\": run once per batch (no shell), it reads the batch as .npy bytes on stdin and writes its answer as .npy bytes on stdout."),
        click.option("--teacher-output", type=str, callback=_check_teacher_output, help="What the teacher answers: auto (default: probabilities when every sampled row is >= 0 and sums to 1, read as their log; else logits), logits (as they are, no detection), probs, topk:K (scores of which only each row's K largest count) or label ((N,) class ids, or the argmax of scores)."),
        click.option("--query-budget", type=click.IntRange(1, 10**12), help="At most this many rows are sent to the teacher, spent in --query-rounds rounds on the rows the student is least sure of (default: every training row, once)."),
        click.option("--query-rounds", type=click.IntRange(1, 1000), help=f"Rounds the --query-budget is spent in: a stratified random sample first, then the least certain rows (default {DistillConfig.query_rounds})."),
        click.option("--query-strategy", type=click.Choice(["margin", "entropy"]), help="How later rounds pick rows: margin (smallest top-1 minus top-2 probability, default) or entropy (highest)."),
        click.option("--trust", is_flag=True, help="Allow loading a whole pickled module (runs code from the file: only for files you trust)."),
        click.option("--target", default="jetson", show_default=True, help="Device profile name or alias (see 'compress targets'), or a path to your own .toml."),
        click.option("--data", "data", default="mnist1d", show_default=True, help="Training data: an .npz (x, y, optional x_test/y_test), an image folder, or 'mnist1d'."),
        click.option("--eval-data", type=str, help="Held-out image folder (default: a sibling test/ or val/ of a train/ folder, else a stratified split)."),
        click.option("--student", type=str, help="file.py:factory or package.module:factory returning an nn.Module, or teacher:every-other (the teacher with blocks 0, 2, 4, ... of its main stack, weights copied; needs a state-dict or --trust teacher). Default: a built-in student sized to a tenth of the teacher."),
        click.option("--output", "output_key", type=str, help="For a student returning a tuple or dict: the index or key of its class scores (default: the first entry)."),
        click.option("--skip-preflight", is_flag=True, help="Do not export and quantize the untrained student before training (the preflight takes seconds and fails early on a student that cannot ship)."),
        click.option("--out", type=click.Path(path_type=Path), help="Run directory for every artifact and the report. Default: runs/<timestamp>."),
        click.option("--image-size", type=str, callback=_check_image_size, help="HxW for image folders, e.g. 32x32 (default: the teacher's input, else the first image's)."),
        click.option("--channels", type=click.IntRange(1, 3), help="1 (grayscale) or 3 (RGB) for image folders."),
        click.option("--max-image-pixels", type=click.IntRange(min=1), help=f"Image folders: refuse an image (or an --image-size) with more pixels than this, a guard against decompression bombs (default {DataConfig.max_image_pixels:,}, PIL's)."),
        click.option("--mean", type=str, callback=_check_norm, help="Per-channel mean to subtract after scaling pixels to [0,1], e.g. 0.485,0.456,0.406."),
        click.option("--std", type=str, callback=_check_norm, help="Per-channel std to divide by after --mean."),
        click.option("--epochs", type=_Finite(min=0, max=1e6, min_open=True), help=f"Passes over the training pool (default {DistillConfig.epochs:g}, and at least {DistillConfig.min_steps} steps)."),
        click.option("--steps", type=click.IntRange(1, STEPS_MAX), help="Optimiser steps (overrides --epochs)."),
        click.option("--batch-size", type=click.IntRange(1, BATCH_MAX), help=f"Training batch size (default {DistillConfig.batch_size})."),
        click.option("--lr", type=_Finite(min=0, min_open=True), help=f"Peak learning rate for AdamW (default {DistillConfig.lr:g})."),
        click.option("--temperature", "-T", type=_Finite(min=0, min_open=True), help=f"Softmax temperature of the KD term (default {DistillConfig.temperature:g})."),
        click.option("--alpha", type=_Finite(0, 1), help=f"Weight of the KD term on labeled rows (default {DistillConfig.alpha:g})."),
        click.option("--loss", type=str, help=f"Distillation loss: kd (Hinton), dkd (decoupled KD), dist (DIST, Pearson relations), labels (no teacher), or another registered loss (compressor.distill.losses) (default {DistillConfig.loss})."),
        click.option("--logit-standardize/--no-logit-standardize", default=None, help="kd/dkd: z-score each row's logits before the temperature (default off)."),
        click.option("--search", type=click.IntRange(0, 10000), help="Try N settings of loss, temperature, alpha, logit standardization, lr and augment (Optuna TPE; trial 0 is your own), each trained briefly and scored on the validation split; then train the student with the best (default 0: off)."),
        click.option("--search-steps", type=click.IntRange(1, STEPS_MAX), help="Steps per search trial (default: a quarter of the full budget, at least 200)."),
        click.option("--augment", type=click.Choice(["none", "auto", "signal", "image", "image-noflip"]), help="Function matching: teacher and student see the same augmented view (auto: by the data's shape; default none)."),
        click.option("--mixup", type=_Finite(min=0), help="Beta(a,a) mixup across pool rows, teacher outputs on the blend as the target (0 = off)."),
        click.option("--cutmix", type=_Finite(min=0), help="Beta(a,a) cutmix for images (0 = off)."),
        click.option("--hint", type=str, help="STUDENT_LAYER=TEACHER_LAYER: also match these activations (eager teachers only, e.g. a state dict with --teacher-arch)."),
        click.option("--hint-weight", type=_Finite(min=0), help=f"Weight of the hint term (default {DistillConfig.hint_weight:g})."),
        click.option("--nproc-per-node", type=click.IntRange(1, THREADS_MAX), help="Train with DistributedDataParallel over this many local processes (torchrun; gloo on CPU, NCCL on GPUs)."),
        click.option("--amp-dtype", type=click.Choice(["bf16", "fp16"]), help="Mixed-precision type on CUDA (default bf16)."),
        click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the student (CUDA only)."),
        click.option("--baseline/--no-baseline", default=None, help="Also train the student on labels alone with the same budget (default: on for the built-in example)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to train (default auto: CUDA when present)."),
        click.option("--seed", type=click.IntRange(0, SEED_MAX), help=f"Seed for splits, initialisation and batch order, 0..{SEED_MAX} (default 0)."),
        click.option("--force", is_flag=True, help="Redo stages that already finished in --out."),
        click.option("--resume", is_flag=True, help="Continue an interrupted distillation from its last checkpoint."),
        click.option("--int8-tolerance", type=_Finite(0, 100), help=f"Accuracy points INT8 may lose against FP32 on a validation split (default {QuantizeConfig.int8_tolerance:g}); beyond it, sensitive nodes stay float, then quantization-aware distillation."),
        click.option("--simplify/--no-simplify", default=None, help="Simplify the exported ONNX graph with onnxslim, checked against PyTorch like the export (default on)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _config_from(kw: dict) -> CompressConfig:
    _check_norm_channels(kw)
    data = DataConfig().replace(source=kw["data"], eval_source=kw["eval_data"], image_size=_list(kw["image_size"], int, 2, "--image-size"),
                                channels=kw["channels"], mean=_list(kw["mean"]), std=_list(kw["std"]), seed=kw["seed"],
                                max_image_pixels=kw["max_image_pixels"])
    if kw["teacher"] and kw["teacher_cmd"]:
        raise click.UsageError("give either --teacher or --teacher-cmd, not both")
    if kw["teacher"] and kw["teacher"].startswith("cmd:"):  # only --teacher-cmd names a command (and says so on the command line)
        raise CompressError(f"--teacher '{kw['teacher'][:80]}' names a command, which --teacher does not run",
                            hint=f"give a command teacher with --teacher-cmd \"{kw['teacher'][4:][:80]}\"")
    teacher = f"cmd:{kw['teacher_cmd']}" if kw["teacher_cmd"] else kw["teacher"]  # a command teacher is stored as 'cmd:…'
    baseline = kw["baseline"] if kw["baseline"] is not None else teacher is None
    distill = DistillConfig().replace(student=kw["student"], output=kw["output_key"], epochs=kw["epochs"], steps=kw["steps"], batch_size=kw["batch_size"], lr=kw["lr"],
                                      temperature=kw["temperature"], alpha=kw["alpha"], baseline=baseline, device=kw["device"], seed=kw["seed"])
    distill = distill.replace(augment=kw["augment"], mixup=kw["mixup"], cutmix=kw["cutmix"], hint=kw["hint"], hint_weight=kw["hint_weight"],
                              nproc_per_node=kw["nproc_per_node"], amp_dtype=kw["amp_dtype"], compile=kw["compile_"])
    if kw["loss"] is not None:
        from .distill.losses import get_loss

        get_loss(kw["loss"])  # a typo fails here, with a did-you-mean, before any training
    distill = distill.replace(loss=kw["loss"], logit_standardize=kw["logit_standardize"], search=kw["search"], search_steps=kw["search_steps"])
    distill = distill.replace(teacher_output=kw["teacher_output"], query_budget=kw["query_budget"], query_rounds=kw["query_rounds"],
                              query_strategy=kw["query_strategy"])
    export = ExportConfig().replace(simplify=kw["simplify"])
    quantize = QuantizeConfig().replace(int8_tolerance=kw["int8_tolerance"])
    return CompressConfig(teacher=teacher, teacher_arch=kw["teacher_arch"], trust=kw["trust"], target=kw["target"], data=data, distill=distill,
                          export=export, quantize=quantize, preflight=not kw["skip_preflight"])


def _check_target(name: str) -> None:
    from .targets import get_target

    get_target(name)  # fail on a typo before any training starts


@click.group(cls=_DefaultToRun, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="compressor", prog_name="compress")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and the final table.")
@click.pass_context
def cli(ctx, debug, quiet):
    """Distil a trained model into a small student, export it to ONNX with INT8, and compare every
    variant with the teacher.

    \b
    With no command, runs the whole pipeline (same options as 'compress run'):
      compress --target jetson                       # built-in example: mnist1d + demo teacher
      compress --teacher model.pt --data train.npz --student student.py:build --out runs/exp1
    """
    ctx.obj = {"debug": debug}
    _setup_logging(quiet, debug)


@cli.command("run")
@pipeline_options
def run_cmd(**kw):
    """Run every stage: distill, export, quantize, bench, report."""
    from .api import compress
    from .bench.report import print_table

    _check_target(kw["target"])
    cfg = _config_from(kw)
    out = kw["out"] or _default_out()
    _log_to_after_create(out, cfg)
    rep = compress(cfg, out, force=kw["force"], resume=kw["resume"])
    print_table(rep)
    click.echo(f"report: {_q(out / 'report.md')}, {_q(out / 'report.html')} and {_q(out / 'report.json')}")


@cli.command("distill")
@pipeline_options
def distill_cmd(**kw):
    """Train the student from the teacher (stage 1)."""
    from ._io import is_writer

    if not is_writer():
        _setup_logging(quiet=True, debug=False)  # `torchrun -m compressor distill …`: one voice, rank 0's
    from .api import distill

    _check_target(kw["target"])
    out = kw["out"] or _default_out()
    cfg = _config_from(kw)
    _log_to_after_create(out, cfg)
    run = distill(cfg, out, force=kw["force"], resume=kw["resume"])
    if is_writer():  # under torchrun, rank 0 speaks for the job
        click.echo(f"student: {_q(run.dir / 'student.pt')}")


@cli.command("distill-worker", hidden=True)
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--resume", is_flag=True)
def distill_worker_cmd(run_dir, resume):
    """One process of a --nproc-per-node job (started by torchrun): the distill stage of an existing run."""
    import os

    if not {"LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"} <= set(os.environ):
        # it runs the code the run's config names: only as a worker that 'compress distill --nproc-per-node' started
        raise CompressError("distill-worker is started by 'compress distill --nproc-per-node N' through torchrun, not by hand",
                            hint="run 'compress distill … --nproc-per-node N' instead")
    from .api import distill
    from .run import Run

    from ._io import is_writer

    if not is_writer():
        _setup_logging(quiet=True, debug=False)  # one voice: rank 0 speaks for the job
    else:
        _log_to(run_dir)
    distill(Run.open(run_dir).config, run_dir, resume=resume)


def _default_out() -> Path:
    from .run import default_run_dir

    return default_run_dir()


def _log_to_after_create(out: Path, cfg: CompressConfig) -> None:
    """Claim --out as the run folder (new, empty or a run already: compressor.ownership), then log there."""
    from .api import claim_out

    claim_out(cfg, out)
    _log_to(out)


run_dir_arg = click.argument("run_dir", type=click.Path(path_type=Path))
int8_tolerance_opt = click.option(
    "--int8-tolerance", type=_Finite(0, 100), help=f"Accuracy points INT8 may lose against FP32 on a validation split of your "
    f"training rows (default {QuantizeConfig.int8_tolerance:g}); when it loses more, sensitive nodes stay in float, then the student is fine-tuned with fake quantization.")
force_opt = click.option("--force", is_flag=True, help="Redo the stage even if it already finished.")
trust_later_opt = click.option("--trust", is_flag=True, help="Run code the run folder names (a student factory, a --teacher-arch, a pickled teacher) "
                               "where distill saved no code-free copy of it: only for run folders you trust. A black-box teacher never runs again.")


@cli.command("export")
@run_dir_arg
@click.option("--opset", type=click.IntRange(13, 23), help="ONNX opset (default: the target profile's).")
@click.option("--atol", type=_Finite(min=0, min_open=True), help=f"Tolerance on max |ONNX - PyTorch| (default {ExportConfig.atol:g}).")
@click.option("--simplify/--no-simplify", default=None, help="Simplify the graph with onnxslim, checked against PyTorch like the export (default: as the run was set up, on).")
@force_opt
@trust_later_opt
def export_cmd(run_dir, opset, atol, simplify, force, trust):
    """Export the trained student to ONNX, simplify it, and check every graph against PyTorch (stage 2)."""
    from .api import export
    from .run import Run

    _log_to(run_dir)
    cfg = Run.open(run_dir).config.export.replace(opset=opset, atol=atol, simplify=simplify)
    export(run_dir, cfg, force=force, trust=trust)


@cli.command("quantize")
@run_dir_arg
@click.option("--recipe", help="INT8 recipe (default: the target's): tensorrt, cpu-u8s8, cpu-s8s8, cpu-u8s8-reduced, cpu-dynamic, cpu-dynamic-reduced, "
              "or cpu-auto (each tried on this CPU, the fastest within --int8-tolerance kept).")
@click.option("--calibration-rows", type=click.IntRange(1, 10**7), help=f"Rows of your data used to calibrate (default {QuantizeConfig.calibration_rows}).")
@click.option("--calibrate-method", type=click.Choice(["minmax", "entropy", "percentile"]))
@click.option("--per-channel/--per-tensor", "per_channel", default=None, help="Weight scales per output channel (default) or per tensor.")
@int8_tolerance_opt
@click.option("--max-float-nodes", type=click.IntRange(0, 100000), help=f"When INT8 misses the tolerance: keep at most this many of the most sensitive nodes in float (default {QuantizeConfig.max_float_nodes}; 0 = off).")
@click.option("--qat-steps", type=click.IntRange(0, STEPS_MAX), help=f"When it still misses: steps of quantization-aware distillation against the teacher (default {QuantizeConfig.qat_steps}; 0 = off).")
@click.option("--exclude-nodes", help="Comma-separated ONNX node names to keep in float from the start.")
@click.option("--fp16/--no-fp16", default=None, help="Also write an FP16 model (default: when the target lists fp16).")
@click.option("--fp16-io", is_flag=True, help="The FP16 model takes and returns float16 (default: float32 in and out).")
@force_opt
@trust_later_opt
def quantize_cmd(run_dir, recipe, calibration_rows, calibrate_method, per_channel, int8_tolerance, max_float_nodes, qat_steps, exclude_nodes,
                 fp16, fp16_io, force, trust):
    """Quantize the ONNX student to INT8 Q/DQ (and FP16), calibrated on your data, within an accuracy tolerance (stage 3)."""
    from .api import quantize
    from .run import Run

    _log_to(run_dir)
    exclude = [n.strip() for n in exclude_nodes.split(",") if n.strip()] if exclude_nodes else None
    cfg = Run.open(run_dir).config.quantize.replace(
        recipe=recipe, calibration_rows=calibration_rows, calibrate_method=calibrate_method, per_channel=per_channel,
        int8_tolerance=int8_tolerance, max_float_nodes=max_float_nodes, qat_steps=qat_steps, exclude_nodes=exclude, fp16=fp16,
        keep_io_fp32=False if fp16_io else None)
    quantize(run_dir, cfg, force=force, trust=trust)


@cli.command("bench")
@run_dir_arg
@click.option("--threads", type=click.IntRange(1, THREADS_MAX), help=f"CPU threads for every runner (default {BenchConfig.threads}).")
@click.option("--min-runs", type=click.IntRange(1, 10**7), help=f"Minimum timed runs per model (default {BenchConfig.min_runs}).")
@click.option("--min-duration", "min_duration_s", type=_Finite(0, 3600), help=f"Minimum timed seconds per model (default {BenchConfig.min_duration_s:g}).")
@click.option("--repeat", type=click.IntRange(1, 1000), help=f"Time every model in N interleaved rounds; the report keeps each round's p50 (what 'compress gate' tests statistically), their median as p50, and flags a spread over 5% as noisy (default {BenchConfig.repeat}).")
@click.option("--batch-sweep", help="Also time the ONNX models at these batch sizes for throughput, e.g. 1,8,32.")
@click.option("--providers", type=click.Choice(["cpu", "cuda", "tensorrt", "auto"]), help="ONNX Runtime execution providers for the ONNX models (default cpu; auto: TensorRT, then CUDA, then CPU, whichever this ONNX Runtime has).")
@force_opt
@trust_later_opt
@click.option("--remote", metavar="USER@HOST", callback=lambda c, p, v: _remote_check(c, p, v, "check_host"), help="Also bench the exported ONNX models on this machine over SSH (system OpenSSH, key auth, BatchMode) and merge its rows, marked '(on USER@HOST)', into the report.")
@click.option("--remote-python", default="python3", show_default=True, help="The Python on the remote machine (needs numpy and onnxruntime, or tensorrt).")
@click.option("--remote-dir", callback=lambda c, p, v: _remote_check(c, p, v, "check_remote_dir"), help="Folder on the remote machine for the temporary bench folder (default: $TMPDIR or /tmp).")
@click.option("--remote-runtime", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="What runs the models remotely: ONNX Runtime on its CPU, or TensorRT engines built there on its GPU.")
@click.option("--ssh-option", "ssh_options", multiple=True, metavar="KEY=VALUE", callback=lambda c, p, v: _remote_check(c, p, v, "check_ssh_option"),
              help="An ssh -o option, repeatable (e.g. StrictHostKeyChecking=no). Options that run a local command or load a local "
                   "library (ProxyCommand, LocalCommand, PermitLocalCommand, KnownHostsCommand, PKCS11Provider, SecurityKeyProvider) are "
                   "refused: whoever writes them runs code on this machine; set them for the host in ~/.ssh/config instead.")
@click.option("--identity", type=click.Path(path_type=Path), help="Private key file for ssh -i.")
@click.option("--port", type=click.IntRange(1, 65535), help="SSH port on the remote machine.")
@click.option("--keep-remote", is_flag=True, help="Leave the remote temporary folder in place (for a look at it).")
def bench_cmd(run_dir, threads, min_runs, min_duration_s, repeat, batch_sweep, providers, force, remote, remote_python, remote_dir, remote_runtime, ssh_options,
              identity, port, keep_remote, trust):
    """Measure accuracy, agreement and latency of every variant; write report.json (stage 4)."""
    from .api import bench, report
    from .bench.report import print_table
    from .run import Run

    _log_to(run_dir)
    if not remote and any(v not in (None, (), False) for v in (remote_dir, identity, port, ssh_options or None, keep_remote or None)):
        raise click.UsageError("--remote-dir, --identity, --port, --ssh-option and --keep-remote go with --remote USER@HOST")
    sweep = _list(batch_sweep, int, flag="--batch-sweep", lo=1, hi=65536) if batch_sweep else None
    cfg = Run.open(run_dir).config.bench.replace(threads=threads, min_runs=min_runs, min_duration_s=min_duration_s, repeat=repeat,
                                                 batch_sweep=sweep, providers=providers)
    rep = bench(run_dir, cfg, force=force, trust=trust)
    report(run_dir)
    if remote:
        from .api import remote_bench

        rep = remote_bench(run_dir, remote, remote_python=remote_python, remote_dir=remote_dir, ssh_options=ssh_options, identity=identity,
                           port=port, runtime=remote_runtime, keep_remote=keep_remote, min_runs=min_runs, min_duration_s=min_duration_s)
    print_table(rep)


def _remote_check(ctx, param, value, check: str):
    """--remote, --remote-dir, --ssh-option: compressor.remote's checks, as click usage errors at parse time."""
    if value is None or value == ():
        return value
    from . import remote

    try:
        for v in (value if isinstance(value, tuple) else (value,)):
            getattr(remote, check)(v)
    except CompressError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


@cli.command("report")
@run_dir_arg
@click.option("--merge", "merge", type=click.Path(path_type=Path), help="Fold a device's report.json (written by the bundle's run_on_device.py) into the run's report first.")
@click.option("--html", "html", is_flag=True, help="Also write report.html: one self-contained page (table, notes, accuracy-vs-latency plot with the Pareto front). An existing report.html is always re-rendered.")
def report_cmd(run_dir, merge, html):
    """Re-render report.md and the terminal table from report.json (stage 5)."""
    from .api import report
    from .bench.report import print_table

    print_table(report(run_dir, merge=merge, html=html or None))
    click.echo(f"report: {_q(Path(run_dir) / 'report.md')}"
               + (f" and {_q(Path(run_dir) / 'report.html')}" if (Path(run_dir) / "report.html").exists() else ""))


@cli.command("bundle")
@run_dir_arg
@click.option("--out", type=click.Path(path_type=Path), help="Bundle folder (default: RUN_DIR/bundle-<target>); the .tar.gz is written beside it.")
@click.option("--force", is_flag=True, help="Replace an existing bundle folder and tarball.")
def bundle_cmd(run_dir, out, force):
    """Write a deploy bundle for the TensorRT target: ONNX files, manifest, build_engine.sh, run_on_device.py."""
    from .api import bundle

    _log_to(run_dir)
    info = bundle(run_dir, out, force=force)
    click.echo(f"bundle: {_q(info['dir'])}\ntarball: {_q(info['tarball'])}\n"
               f"on the device: bash build_engine.sh && python3 run_on_device.py; "
               f"then here: compress report {_q(run_dir)} --merge report.json")


@cli.command("gate")
@click.argument("current", type=click.Path(path_type=Path))
@click.option("--baseline", required=True, type=click.Path(path_type=Path), help="The baseline: a baseline bundle folder (written by --update-baseline; its models are re-timed here), a run directory, or a bare report.json.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="A gate.toml with thresholds and [[floor]] tables (flags override it).")
@click.option("--max-accuracy-drop", type=_Finite(0, 100), help=f"Accuracy points a model may lose (default {GateConfig.max_accuracy_drop:g}).")
@click.option("--min-agreement", type=_Finite(0, 1), help="Fraction of held-out rows each student must agree with the teacher on (default: not checked).")
@click.option("--max-latency-regression", type=_Finite(min=0), help=f"Fraction a latency may grow (default {GateConfig.max_latency_regression:g}), with a one-sided test p < alpha on the rounds (Wilcoxon signed-rank when re-timed).")
@click.option("--max-size-growth", type=_Finite(min=0), help=f"Fraction a model file may grow (default {GateConfig.max_size_growth:g}).")
@click.option("--rounds", type=click.IntRange(min=5, max=1000), help=f"Re-timing: interleaved rounds per model and side (default {GateConfig.rounds}; at least 5, or no test could reach p < 0.05).")
@click.option("--round-duration", "round_duration_s", type=_Finite(min=0.001, max=60), help=f"Re-timing: seconds per model per round (default {GateConfig.round_duration_s:g}).")
@click.option("--absolute-latency", is_flag=True, default=None, help="Do not re-time: compare the two reports' p50s; both must come from the same host (exit 2 otherwise).")
@click.option("--floor", "floors", multiple=True, help="An absolute floor, MODEL:METRIC>=VALUE or <=VALUE, e.g. 'student onnx int8:accuracy>=0.93' (repeatable).")
@click.option("--junit", type=click.Path(path_type=Path), help="Also write JUnit XML here (one test case per check).")
@click.option("--markdown", type=click.Path(path_type=Path), help="Also write the Markdown summary here (it is appended to $GITHUB_STEP_SUMMARY when set).")
@click.option("--update-baseline", is_flag=True, help="After comparing, write CURRENT as the new baseline and exit 0: into a folder, a baseline bundle (report, model files, latency sample, checksums); to FILE.json, the bare report.")
def gate_cmd(current, baseline, config_path, max_accuracy_drop, min_agreement, max_latency_regression, max_size_growth, rounds, round_duration_s,
             absolute_latency, floors, junit, markdown, update_baseline):
    """Compare CURRENT (a run directory or report.json) with a baseline: exit 0 pass, 1 regression, 2 bad input, 4 the gate's own error."""
    global _BUG_EXIT
    _BUG_EXIT = EXIT_GATE_BUG  # an internal error must not read as a regression (1) or a pass (0)
    from ._io import write_text
    from .api import gate
    from .gate import github_summary, junit_xml, load_gate_config, print_table, render_markdown

    bundle = update_baseline and (Path(baseline).is_dir() or Path(baseline).suffix.lower() != ".json")
    if bundle:
        from .bench.retime import check_bundle_target

        check_bundle_target(Path(baseline))  # before any comparison: never a folder of someone else's files
    if update_baseline and not _baseline_exists(baseline):  # the first baseline: nothing to compare yet
        click.echo(_write_baseline(current, baseline, bundle) + " (no baseline yet)")
        return
    parsed = [_parse_floor(f) for f in floors]
    for what, out in (("--junit", junit), ("--markdown", markdown)):  # before the minutes of timing, and never a device or a link
        if out is not None and (Path(out).is_symlink() or (Path(out).exists() and not Path(out).is_file())):
            raise CompressError(f"{what} {out} exists and is not a regular file (a folder, a link or a device)", hint="give a file path")
        if out is not None and _is_gate_input(Path(out), (Path(current), Path(baseline))):
            raise CompressError(f"{what} {out} is one of the gate's inputs (CURRENT, --baseline, or a file inside them)",
                                hint="write the summary somewhere else")
    cfg = load_gate_config(config_path, extra_floors=parsed, max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement,
                           max_latency_regression=max_latency_regression, max_size_growth=max_size_growth, rounds=rounds,
                           round_duration_s=round_duration_s, absolute_latency=absolute_latency or None)
    res = gate(current, baseline, cfg)
    print_table(res)
    md = render_markdown(res, str(current), str(baseline))
    if markdown:
        write_text(markdown, md)
    github_summary(md)
    if junit:
        write_text(junit, junit_xml(res))
    if update_baseline:
        click.echo(_write_baseline(current, baseline, bundle))
        return
    if not res.passed:
        raise click.exceptions.Exit(1)


_ARTIFACT_SUFFIXES = (".json", ".onnx", ".pt", ".pt2", ".npy", ".npz", ".lock", ".log", ".engine", ".gz", ".sh", ".py")


def _is_gate_input(out: Path, inputs: tuple) -> bool:
    """out is CURRENT or the baseline (a file), or a file of the kind the tool keeps inside either (a run or bundle
    folder: reports, manifests, models, checksums); a new summary such as RUN/gate.xml is fine."""
    import os

    try:
        o = Path(os.path.abspath(out)).parent.resolve() / out.name
        for p in inputs:
            r = p.resolve()
            if out.exists() and p.exists() and os.path.samefile(out, p):
                return True
            if p.is_dir() and o.is_relative_to(r) and (o.suffix.lower() in _ARTIFACT_SUFFIXES or o.name == "SHA256SUMS"
                                                        or o.name.startswith("report.")):
                return True
    except (OSError, RuntimeError):
        return True  # unresolvable (a link loop): not a place to write to
    return False


def _baseline_exists(baseline: Path) -> bool:
    b = Path(baseline)
    return (b / "report.json").is_file() if b.is_dir() else b.is_file()


def _write_baseline(current: Path, baseline: Path, bundle: bool) -> str:
    from ._io import read_regular_file, write_bytes
    from .bench.report import REPORT_MAX_BYTES, load_report
    from .bench.retime import open_side, write_bundle

    if bundle:
        marker = write_bundle(open_side(current, "current report"), Path(baseline))
        return f"gate: wrote the baseline bundle {_q(baseline)} ({len(marker['files'])} files: {', '.join(sorted(marker['files']))})"
    from .api import _report_for

    cur_path = _report_for(current, "current report")
    load_report(cur_path)
    write_bytes(baseline, read_regular_file(cur_path, "current report", REPORT_MAX_BYTES))
    return (f"gate: wrote {_q(cur_path)} as the new baseline {_q(baseline)} (a bare report: its latencies are comparable only on the same host; "
            "a folder as --baseline keeps the model files, which the gate re-times on any machine)")


def _parse_floor(text: str) -> dict:
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


@cli.command("targets")
@click.argument("name", required=False)
@click.option("--text", "as_text", is_flag=True, help="With NAME: a readable view (every figure with its source) instead of JSON.")
def targets_cmd(name, as_text):
    """List the device profiles, or show one (JSON; --text for a readable view)."""
    import json

    from .targets import get_target, list_targets, profile_warnings

    if name:
        profile = get_target(name)
        for line in profile_warnings(profile):
            click.echo(f"warning: {printable(line)}", err=True)
        click.echo(printable(_profile_text(profile)) if as_text else json.dumps(profile, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    profiles = list_targets()
    table = Table()
    # the names are what users type: never wrap or cut them, whatever the width
    table.add_column("name", no_wrap=True, min_width=max(len(p["name"]) for p in profiles))
    # aliases are typed too: one a line, never cut
    table.add_column("aliases", no_wrap=True, min_width=max((len(a) for p in profiles for a in p.get("aliases", [])), default=7))
    for h in ("kind", "runtime", "precisions", "INT8 TOPS\ndense/sparse", "GB/s", "memory GB"):
        table.add_column(h, overflow="fold")
    for p in profiles:
        table.add_row(p["name"], "\n".join(p.get("aliases", [])), p["kind"], _runtime_text(p), " ".join(p["quantization"]["precisions"]),
                      f"{_fig(p, 'int8_dense_tops')} / {_fig(p, 'int8_sparse_tops')}", _fig(p, "memory_bandwidth_gbps"), _fig(p, "memory_gb"))
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # piped: as wide as print_table's, so rows are not cut to 80 columns
    console.print(table)
    console.print("-: no figure (not published, or no single figure for this kind of device); 'compress targets NAME --text' shows the sources.")


def _runtime_text(p: dict) -> str:
    rt = p["runtime"]
    return f"{rt['name']} {rt.get('version') or rt.get('provider', '').replace('ExecutionProvider', ' EP')}".strip()


def _fig(p: dict, key: str) -> str:
    from .targets import figure

    v = figure(p, key)
    return "-" if v is None else f"{v:g}" if isinstance(v, (int, float)) else str(v)


def _profile_text(p: dict) -> str:
    """One profile, every hardware figure with its source."""
    rt, q = p["runtime"], p["quantization"]
    lines = [f"{p['name']}: {p['description']}", f"  aliases: {', '.join(p.get('aliases', [])) or '-'}", f"  kind: {p['kind']}",
             f"  runtime: {_runtime_text(p)}"]
    if rt.get("platform"):
        lines.append(f"  platform: {rt['platform']}")
    if rt.get("provider"):
        lines.append(f"  execution provider: {rt['provider']}")
    lines += [f"  runtime source: {rt['source']}", f"  onnx opset: {rt['onnx_opset']}", f"  precisions: {', '.join(q['precisions'])}",
              f"  int8 recipe: {q['int8_recipe']}"]
    if p.get("cpu_arch"):
        lines.append(f"  cpu arch: {p['cpu_arch']}")
    if p.get("requires_cpu_features"):
        lines.append(f"  requires cpu features: {', '.join(p['requires_cpu_features'])}")
    hw = p.get("hardware", {})
    if hw:
        lines.append("  hardware:")
    for key, fig in hw.items():
        v = fig["value"]
        shown = ", ".join(f"{k}: {w:g} W" for k, w in v.items()) if isinstance(v, dict) else f"{v:g}" if isinstance(v, (int, float)) else str(v)
        lines.append(f"    {key}: {shown}")
        if fig.get("note"):
            lines.append(f"      note: {fig['note']}")
        lines.append(f"      source: {fig['source']}")
    for n in p.get("notes", []):
        lines.append(f"  note: {n}")
    return "\n".join(lines)


_ARGV: list[str] | None = None  # the arguments main() was called with (None: sys.argv[1:])


def _args() -> list[str]:
    return list(_ARGV) if _ARGV is not None else sys.argv[1:]


def _resumable() -> bool:
    """Whether the command line's subcommand takes --resume: the pipeline (named or implicit) and distill only."""
    args = list(_args())
    while args and args[0] in ("--debug", "--quiet", "-q"):
        args.pop(0)
    return not args or args[0] in ("run", "distill") or args[0] not in cli.commands


def _resume_command() -> str:
    args = [a for a in _args() if a != "--resume"]
    return "compress " + " ".join(shlex.quote(a) for a in args) + " --resume"


def _log_trace(what: str) -> None:
    """Write the traceback to the run directory's log only (the console shows one line, or --debug's trace)."""
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(log.makeRecord(log.name, logging.DEBUG, __file__, 0, what, None, sys.exc_info()))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning our errors into one line and a documented exit code."""
    def _term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 file name (surrogates from os.fsdecode) printed as \udcXX, not a crash
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass
    global _BUG_EXIT, _ARGV
    _BUG_EXIT = EXIT_BUG
    _ARGV = [str(a) for a in argv] if argv is not None else None
    debug = "--debug" in _args()
    try:
        rv = cli.main(args=argv, prog_name="compress", standalone_mode=False)
        # click returns an Exit's code instead of raising it when not standalone (compress gate's exit 1)
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    except click.exceptions.Abort:
        click.echo(f"interrupted. Resume with: {_resume_command()}" if _resumable() else "interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        import io

        buf = io.StringIO()
        exc.show(file=buf)  # click quotes the bad value as typed: its control characters are shown, never sent to the terminal
        click.echo(printable(buf.getvalue()), err=True, nl=False)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        _log_trace("interrupted")
        click.echo(f"\ninterrupted; progress is saved. Resume with: {_resume_command()}" if _resumable() else "\ninterrupted", err=True)
        return EXIT_INTERRUPTED
    except CompressError as exc:
        _log_trace("error")
        if debug:
            traceback.print_exc()
        click.echo(f"error: {printable(exc)}", err=True)
        return exc.exit_code
    except Exception as exc:  # a bug: keep the trace in the log, show one line unless --debug
        _log_trace("internal error")
        if debug:
            traceback.print_exc()
        click.echo(f"internal error: {type(exc).__name__}: {printable(exc)} (rerun with --debug for the traceback; please report it)", err=True)
        return _BUG_EXIT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
