"""The `compress` command: argument parsing only; every action is a call into compressor.api.

Commands are built from reusable option groups (Polygraphy's argument groups): a group declares its options once, each
beside the config field it fills, and builds its config dataclass from the parsed values (OptionGroup.config); the
commands print what the api returns and map it to an exit code. Heavy libraries (torch, onnxruntime) are imported only
when a command runs, so --help is fast."""
from __future__ import annotations

import dataclasses
import errno
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


def _check_budget(ctx, param, value):
    if not value:
        return value
    from .models.budget import parse_budget

    try:
        parse_budget(list(value))
    except CompressError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


def _check_teacher_output(ctx, param, value):
    if value is None:
        return None
    from .distill.blackbox import parse_teacher_output

    try:
        parse_teacher_output(value)
    except CompressError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value.strip().lower()


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


# --- option groups (Polygraphy's argument groups) ---------------------------------------------------------------
class Opt:
    """One option, declared once: click's declaration (decls and attrs, as click.option takes them) and the field its
    value fills. to: the field (default: the option's parameter name; None: no field, the command reads the value
    itself); convert: applied to a value that is set (not None) before it fills the field."""

    def __init__(self, *decls: str, to: str | None = "", convert=None, **attrs):
        self.decls, self.attrs, self.convert = decls, attrs, convert
        self.name = click.Option(list(decls), **attrs).name
        self.to = self.name if to == "" else to

    def add_to(self, fn):
        return click.option(*self.decls, **self.attrs)(fn)

    def value(self, kw: dict):
        v = kw.get(self.name)
        return self.convert(v) if self.convert is not None and v is not None else v


class OptionGroup:
    """A reusable group of options: as a decorator it adds them to a command, in order; config(kw) builds the group's
    config from the command's parsed values. cls: the config dataclass, or None for a dict of keyword arguments (every
    field, None included); build(values): the checks and fields that take more than one of the group's options (values:
    the group's own, by parameter name); it raises on a bad combination and returns the fields it sets."""

    def __init__(self, cls, *opts: Opt, build=None, shown: tuple[Opt, ...] | None = None):
        self.cls, self.opts, self.build = cls, opts, build
        self.shown = opts if shown is None else shown
        if cls is not None:  # a typo in a field name fails on import, never silently
            unknown = {o.to for o in opts if o.to} - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")

    def __call__(self, fn):
        for o in reversed(self.shown):
            fn = o.add_to(fn)
        return fn

    def only(self, *names: str) -> OptionGroup:
        """The group showing only these options (the pipeline takes --simplify of the export options); config() builds the
        same config, the options not shown staying unset."""
        by_name = {o.name: o for o in self.opts}
        return OptionGroup(self.cls, *self.opts, build=self.build, shown=tuple(by_name[n] for n in names))

    def config(self, kw: dict, base=None):
        """The config from a command's parsed values: base (a config, or a function giving one, called once the values
        are checked; default cls()) with each option's field set where its value is set."""
        derived = self.build({o.name: kw.get(o.name) for o in self.opts}) if self.build is not None else {}
        fields = {**{o.to: o.value(kw) for o in self.opts if o.to}, **derived}
        if self.cls is None:
            return fields
        base = base() if callable(base) else self.cls() if base is None else base
        return base.replace(**fields)


def _teacher_fields(v: dict) -> dict:
    if v["teacher"] and v["teacher_cmd"]:
        raise click.UsageError("give either --teacher or --teacher-cmd, not both")
    if v["teacher"] and v["teacher"].startswith("cmd:"):  # only --teacher-cmd names a command (and says so on the command line)
        raise CompressError(f"--teacher '{v['teacher'][:80]}' names a command, which --teacher does not run",
                            hint=f"give a command teacher with --teacher-cmd \"{v['teacher'][4:][:80]}\"")
    return {"teacher": f"cmd:{v['teacher_cmd']}" if v["teacher_cmd"] else v["teacher"]}  # a command teacher is stored as 'cmd:…'


def _check_loss(v: dict) -> dict:
    if v["loss"] is not None:
        from .distill.losses import get_loss

        get_loss(v["loss"])  # a typo fails here, with a did-you-mean, before any training
    return {}


def _check_remote(v: dict) -> dict:
    if not v["remote"] and any(x not in (None, (), False) for x in (v["remote_dir"], v["identity"], v["port"], v["ssh_options"] or None,
                                                                    v["keep_remote"] or None)):
        raise click.UsageError("--remote-dir, --identity, --port, --ssh-option and --keep-remote go with --remote USER@HOST")
    return {}


def _check_target(name: str) -> None:
    from .targets import get_target

    get_target(name)  # fail on a typo before any training starts


# CompressConfig's own fields (the sub-configs come from the groups below); --seed seeds the data split and the training
PIPELINE_OPTIONS = OptionGroup(
    CompressConfig,
    Opt("--teacher", to=None, type=str, help="Trained model: TorchScript, torch.export .pt2, ONNX, or a state dict (with --teacher-arch); or a black box: file.py:fn / package.module:fn, a Python function from a numpy batch to a numpy answer. Default: the built-in demo teacher."),
    Opt("--teacher-arch", type=str, help="file.py:factory (or package.module:factory) building the module for a state-dict teacher."),
    Opt("--teacher-cmd", to=None, type=str, help="A black-box teacher as a command, e.g. \"python ask_api.py\": run once per batch (no shell), it reads the batch as .npy bytes on stdin and writes its answer as .npy bytes on stdout."),
    Opt("--trust", is_flag=True, help="Allow loading a whole pickled module (runs code from the file: only for files you trust)."),
    Opt("--target", default="jetson", show_default=True, help="Device profile name or alias (see 'compress targets'), or a path to your own .toml."),
    Opt("--skip-preflight", to="preflight", convert=lambda v: not v, is_flag=True, help="Do not export and quantize the untrained student before training (the preflight takes seconds and fails early on a student that cannot ship)."),
    Opt("--seed", to=None, type=click.IntRange(0, SEED_MAX), help=f"Seed for splits, initialisation and batch order, 0..{SEED_MAX} (default 0)."),
    build=_teacher_fields,
)
# how the pipeline runs (keyword arguments of api.compress and api.distill); --out is their second argument
PIPELINE_RUN = OptionGroup(
    None,
    Opt("--out", to=None, type=click.Path(path_type=Path), help="Run directory for every artifact and the report. Default: runs/<timestamp>."),
    Opt("--force", is_flag=True, help="Redo stages that already finished in --out."),
    Opt("--resume", is_flag=True, help="Continue an interrupted distillation from its last checkpoint."),
)
DATA_OPTIONS = OptionGroup(
    DataConfig,
    Opt("--data", "data", to="source", default="mnist1d", show_default=True, help="Training data: an .npz (x, y, optional x_test/y_test), a folder with x.npy/y.npy (memory-mapped), an image folder, WebDataset tar shards ('shards/train-{000000..000099}.tar'; a sample without .cls is unlabeled), or 'mnist1d'."),
    Opt("--eval-data", to="eval_source", type=str, help="Held-out image folder, or shards when --data is shards (default: a sibling test/ or val/ of a train/ folder, else a stratified split)."),
    Opt("--image-size", convert=lambda v: _list(v, int, 2, "--image-size"), type=str, callback=_check_image_size, help="HxW for image folders, e.g. 32x32 (default: the teacher's input, else the first image's)."),
    Opt("--channels", type=click.IntRange(1, 3), help="1 (grayscale) or 3 (RGB) for image folders."),
    Opt("--max-image-pixels", type=click.IntRange(min=1), help=f"Image folders: refuse an image (or an --image-size) with more pixels than this, a guard against decompression bombs (default {DataConfig.max_image_pixels:,}, PIL's)."),
    Opt("--mean", convert=_list, type=str, callback=_check_norm, help="Per-channel mean to subtract after scaling pixels to [0,1], e.g. 0.485,0.456,0.406."),
    Opt("--std", convert=_list, type=str, callback=_check_norm, help="Per-channel std to divide by after --mean."),
    Opt("--unlabeled", multiple=True, type=click.Path(), convert=lambda v: [str(p) for p in v] or None,
        help="A folder of images without labels (any nesting, no class folders), added to the training pool for the teacher to label softly; repeatable."),
    Opt("--resize", type=click.IntRange(1, 16384), help="Image folders: scale each image's shorter side to N, then cut out the centre --crop (e.g. --resize 256 --crop 224, the usual ImageNet evaluation transform)."),
    Opt("--crop", type=click.IntRange(1, 16384), help="Image folders: the side of the centre crop (images become MxM; without --resize the shorter side is scaled to M first)."),
    Opt("--workers", type=click.IntRange(0, 256), help="Processes decoding images in the background (DataLoader workers; default: the usable cores, at most 8; 0: decode in the main process)."),
    build=lambda v: _check_norm_channels(v) or {},
)
DISTILL_OPTIONS = OptionGroup(
    DistillConfig,
    Opt("--teacher-output", type=str, callback=_check_teacher_output, help="What the teacher answers: auto (default: probabilities when every sampled row is >= 0 and sums to 1, read as their log; else logits), logits (as they are, no detection), probs, topk:K (scores of which only each row's K largest count) or label ((N,) class ids, or the argmax of scores)."),
    Opt("--query-budget", type=click.IntRange(1, 10**12), help="At most this many rows are sent to the teacher, spent in --query-rounds rounds on the rows the student is least sure of (default: every training row, once)."),
    Opt("--query-rounds", type=click.IntRange(1, 1000), help=f"Rounds the --query-budget is spent in: a stratified random sample first, then the least certain rows (default {DistillConfig.query_rounds})."),
    Opt("--query-strategy", type=click.Choice(["margin", "entropy"]), help="How later rounds pick rows: margin (smallest top-1 minus top-2 probability, default) or entropy (highest)."),
    Opt("--student", type=str, help="auto (a student sized to --budget, chosen among a built-in edge family, timm's edge models when timm is installed, and the teacher pruned with Torch-Pruning, by a short distillation each), "
        "file.py:factory or package.module:factory returning an nn.Module, builtin:NAME (mobilenet, cnn2d, cnn1d, mlp, transformer), timm:NAME (pretrained=False), "
        "teacher:every-other (the teacher with blocks 0, 2, 4, ... of its main stack, weights copied) or teacher:pruned (the teacher pruned to --budget); teacher:* needs a state-dict or --trust teacher. "
        "Default: a built-in student sized to a tenth of the teacher."),
    Opt("--budget", multiple=True, convert=lambda v: list(v) or None, callback=_check_budget,
        help="For --student auto or teacher:pruned: params=0.1 or macs=0.25 (fractions of the teacher), params=2M or macs=300M (absolute), "
             "latency_ms=2 (on the target: measured when it is this host, else the roofline's estimate); comma-separated or repeated (default params=0.1)."),
    Opt("--auto-steps", type=click.IntRange(1, STEPS_MAX), help="For --student auto: steps each candidate is distilled before it is scored on the validation split (default: a tenth of the run, 100 to 1000)."),
    Opt("--output", "output_key", to="output", type=str, help="For a student returning a tuple or dict: the index or key of its class scores (default: the first entry)."),
    Opt("--epochs", type=_Finite(min=0, max=1e6, min_open=True), help=f"Passes over the training pool (default {DistillConfig.epochs:g}, and at least {DistillConfig.min_steps} steps)."),
    Opt("--steps", type=click.IntRange(1, STEPS_MAX), help="Optimiser steps (overrides --epochs)."),
    Opt("--batch-size", type=click.IntRange(1, BATCH_MAX), help=f"Training batch size (default {DistillConfig.batch_size})."),
    Opt("--lr", type=_Finite(min=0, min_open=True), help=f"Peak learning rate for AdamW (default {DistillConfig.lr:g})."),
    Opt("--temperature", "-T", type=_Finite(min=0, min_open=True), help=f"Softmax temperature of the KD term (default {DistillConfig.temperature:g})."),
    Opt("--alpha", type=_Finite(0, 1), help=f"Weight of the KD term on labeled rows (default {DistillConfig.alpha:g})."),
    Opt("--loss", type=str, help=f"Distillation loss: kd (Hinton), dkd (decoupled KD), dist (DIST, Pearson relations), labels (no teacher), or another registered loss (compressor.distill.losses) (default {DistillConfig.loss})."),
    Opt("--logit-standardize/--no-logit-standardize", default=None, help="kd/dkd: z-score each row's logits before the temperature (default off)."),
    Opt("--search", type=click.IntRange(0, 10000), help="Try N settings of loss, temperature, alpha, logit standardization, lr and augment (Optuna TPE; trial 0 is your own), each trained briefly and scored on the validation split; then train the student with the best (default 0: off)."),
    Opt("--search-steps", type=click.IntRange(1, STEPS_MAX), help="Steps per search trial (default: a quarter of the full budget, at least 200)."),
    Opt("--augment", type=click.Choice(["none", "auto", "signal", "image", "image-noflip"]), help="Function matching: teacher and student see the same augmented view (auto: by the data's shape; default none)."),
    Opt("--mixup", type=_Finite(min=0), help="Beta(a,a) mixup across pool rows, teacher outputs on the blend as the target (0 = off)."),
    Opt("--cutmix", type=_Finite(min=0), help="Beta(a,a) cutmix for images (0 = off)."),
    Opt("--hint", type=str, help="STUDENT_LAYER=TEACHER_LAYER: also match these activations (eager teachers only, e.g. a state dict with --teacher-arch)."),
    Opt("--hint-weight", type=_Finite(min=0), help=f"Weight of the hint term (default {DistillConfig.hint_weight:g})."),
    Opt("--nproc-per-node", type=click.IntRange(1, THREADS_MAX), help="Train with DistributedDataParallel over this many local processes (torchrun; gloo on CPU, NCCL on GPUs)."),
    Opt("--amp-dtype", type=click.Choice(["bf16", "fp16"]), help="Mixed-precision type on CUDA (default bf16)."),
    Opt("--compile/--no-compile", "compile_", to="compile", default=None, help="torch.compile the student (CUDA only)."),
    Opt("--baseline/--no-baseline", default=None, help="Also train the student on labels alone with the same budget (default: on for the built-in example)."),
    Opt("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to train (default auto: CUDA when present)."),
    build=_check_loss,
)
EXPORT_OPTIONS = OptionGroup(
    ExportConfig,
    Opt("--opset", type=click.IntRange(13, 23), help="ONNX opset (default: the target profile's)."),
    Opt("--atol", type=_Finite(min=0, min_open=True), help=f"Tolerance on max |ONNX - PyTorch| (default {ExportConfig.atol:g})."),
    Opt("--simplify/--no-simplify", default=None, help="Simplify the exported ONNX graph with onnxslim, checked against PyTorch like the export (default: on for a new run, else as the run was set up)."),
)
QUANTIZE_OPTIONS = OptionGroup(
    QuantizeConfig,
    Opt("--recipe", help="INT8 recipe (default: the target's): tensorrt, cpu-u8s8, cpu-s8s8, cpu-u8s8-reduced, cpu-dynamic, cpu-dynamic-reduced, "
        "or cpu-auto (each tried on this CPU, the fastest within --int8-tolerance kept)."),
    Opt("--calibration-rows", type=click.IntRange(1, 10**7), help=f"Rows of your data used to calibrate (default {QuantizeConfig.calibration_rows})."),
    Opt("--calibrate-method", type=click.Choice(["minmax", "entropy", "percentile"])),
    Opt("--per-channel/--per-tensor", "per_channel", default=None, help="Weight scales per output channel (default) or per tensor."),
    Opt("--int8-tolerance", type=_Finite(0, 100), help=f"Accuracy points INT8 may lose against FP32 on a validation split of your training rows "
        f"(default {QuantizeConfig.int8_tolerance:g}); when it loses more, sensitive nodes stay in float, then the student is fine-tuned with fake quantization."),
    Opt("--max-float-nodes", type=click.IntRange(0, 100000), help=f"When INT8 misses the tolerance: keep at most this many of the most sensitive nodes in float (default {QuantizeConfig.max_float_nodes}; 0 = off)."),
    Opt("--qat-steps", type=click.IntRange(0, STEPS_MAX), help=f"When it still misses: steps of quantization-aware distillation against the teacher (default {QuantizeConfig.qat_steps}; 0 = off)."),
    Opt("--exclude-nodes", convert=lambda v: [n.strip() for n in v.split(",") if n.strip()] if v else None,
        help="Comma-separated ONNX node names to keep in float from the start."),
    Opt("--fp16/--no-fp16", default=None, help="Also write an FP16 model (default: when the target lists fp16)."),
    Opt("--fp16-io", to="keep_io_fp32", convert=lambda v: False if v else None, is_flag=True, help="The FP16 model takes and returns float16 (default: float32 in and out)."),
)
BENCH_OPTIONS = OptionGroup(
    BenchConfig,
    Opt("--threads", type=click.IntRange(1, THREADS_MAX), help=f"CPU threads for every runner (default {BenchConfig.threads})."),
    Opt("--min-runs", type=click.IntRange(1, 10**7), help=f"Minimum timed runs per model (default {BenchConfig.min_runs})."),
    Opt("--min-duration", "min_duration_s", type=_Finite(0, 3600), help=f"Minimum timed seconds per model (default {BenchConfig.min_duration_s:g})."),
    Opt("--repeat", type=click.IntRange(1, 1000), help=f"Time every model in N interleaved rounds; the report keeps each round's p50 (what 'compress gate' tests statistically), their median as p50, and flags a spread over 5% as noisy (default {BenchConfig.repeat})."),
    Opt("--batch-sweep", convert=lambda v: _list(v, int, flag="--batch-sweep", lo=1, hi=65536) if v else None,
        help="Also time the ONNX models at these batch sizes for throughput, e.g. 1,8,32."),
    Opt("--providers", type=click.Choice(["cpu", "cuda", "tensorrt", "auto"]), help="ONNX Runtime execution providers for the ONNX models (default cpu; auto: TensorRT, then CUDA, then CPU, whichever this ONNX Runtime has)."),
)
# keyword arguments of api.remote_bench; --remote is its host argument
REMOTE_OPTIONS = OptionGroup(
    None,
    Opt("--remote", to=None, metavar="USER@HOST", callback=lambda c, p, v: _remote_check(c, p, v, "check_host"), help="Also bench the exported ONNX models on this machine over SSH (system OpenSSH, key auth, BatchMode) and merge its rows, marked '(on USER@HOST)', into the report."),
    Opt("--remote-python", default="python3", show_default=True, help="The Python on the remote machine (needs numpy and onnxruntime, or tensorrt)."),
    Opt("--remote-dir", callback=lambda c, p, v: _remote_check(c, p, v, "check_remote_dir"), help="Folder on the remote machine for the temporary bench folder (default: $TMPDIR or /tmp)."),
    Opt("--remote-runtime", to="runtime", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
        help="What runs the models remotely: ONNX Runtime on its CPU, or TensorRT engines built there on its GPU."),
    Opt("--ssh-option", "ssh_options", multiple=True, metavar="KEY=VALUE", callback=lambda c, p, v: _remote_check(c, p, v, "check_ssh_option"),
        help="An ssh -o option, repeatable (e.g. StrictHostKeyChecking=no). Options that run a local command or load a local "
             "library (ProxyCommand, LocalCommand, PermitLocalCommand, KnownHostsCommand, PKCS11Provider, SecurityKeyProvider) are "
             "refused: whoever writes them runs code on this machine; set them for the host in ~/.ssh/config instead."),
    Opt("--identity", type=click.Path(path_type=Path), help="Private key file for ssh -i."),
    Opt("--port", type=click.IntRange(1, 65535), help="SSH port on the remote machine."),
    Opt("--keep-remote", is_flag=True, help="Leave the remote temporary folder in place (for a look at it)."),
    build=_check_remote,
)
# how a later stage runs on an existing run folder (keyword arguments of api.export, api.quantize, api.bench)
STAGE_RUN = OptionGroup(
    None,
    Opt("--force", is_flag=True, help="Redo the stage even if it already finished."),
    Opt("--trust", is_flag=True, help="Run code the run folder names (a student factory, a --teacher-arch, a pickled teacher) "
        "where distill saved no code-free copy of it: only for run folders you trust. A black-box teacher never runs again."),
)
# the gate's settings (keyword arguments of api.gate_ci): a gate.toml, the flags over it, the summaries, --update-baseline
GATE_OPTIONS = OptionGroup(
    None,
    Opt("--config", "config_path", type=click.Path(path_type=Path), help="A gate.toml with thresholds and [[floor]] tables (flags override it)."),
    Opt("--max-accuracy-drop", type=_Finite(0, 100), help=f"Accuracy points a model may lose (default {GateConfig.max_accuracy_drop:g})."),
    Opt("--min-agreement", type=_Finite(0, 1), help="Fraction of held-out rows each student must agree with the teacher on (default: not checked)."),
    Opt("--max-latency-regression", type=_Finite(min=0), help=f"Fraction a latency may grow (default {GateConfig.max_latency_regression:g}), with a one-sided test p < alpha on the rounds (Wilcoxon signed-rank when re-timed)."),
    Opt("--max-size-growth", type=_Finite(min=0), help=f"Fraction a model file may grow (default {GateConfig.max_size_growth:g})."),
    Opt("--rounds", type=click.IntRange(min=5, max=1000), help=f"Re-timing: interleaved rounds per model and side (default {GateConfig.rounds}; at least 5, or no test could reach p < 0.05)."),
    Opt("--round-duration", "round_duration_s", type=_Finite(min=0.001, max=60), help=f"Re-timing: seconds per model per round (default {GateConfig.round_duration_s:g})."),
    Opt("--absolute-latency", convert=lambda v: v or None, is_flag=True, default=None, help="Do not re-time: compare the two reports' p50s; both must come from the same host (exit 2 otherwise)."),
    Opt("--floor", "floors", multiple=True, help="An absolute floor, MODEL:METRIC>=VALUE or <=VALUE, e.g. 'student onnx int8:accuracy>=0.93' (repeatable)."),
    Opt("--junit", type=click.Path(path_type=Path), help="Also write JUnit XML here (one test case per check)."),
    Opt("--markdown", type=click.Path(path_type=Path), help="Also write the Markdown summary here (it is appended to $GITHUB_STEP_SUMMARY when set)."),
    Opt("--update-baseline", is_flag=True, help="After comparing, write CURRENT as the new baseline and exit 0: into a folder, a baseline bundle (report, model files, latency sample, checksums); to FILE.json, the bare report."),
)
PIPELINE_GROUPS = (PIPELINE_OPTIONS, PIPELINE_RUN, DATA_OPTIONS, DISTILL_OPTIONS, EXPORT_OPTIONS.only("simplify"), QUANTIZE_OPTIONS.only("int8_tolerance"))


def pipeline_options(fn):
    """Every option of the full pipeline and `compress distill`: PIPELINE_GROUPS, in order."""
    for group in reversed(PIPELINE_GROUPS):
        fn = group(fn)
    return fn


def pipeline_config(kw: dict) -> CompressConfig:
    """The pipeline's config from its groups; the checks run in the order they always have (target, data, teacher, loss)."""
    _check_target(kw["target"])
    data = DATA_OPTIONS.config(kw).replace(seed=kw["seed"])
    cfg = PIPELINE_OPTIONS.config(kw)
    distill = DISTILL_OPTIONS.config(kw).replace(seed=kw["seed"])
    if kw["baseline"] is None:  # the labels-only baseline: on for the built-in example
        distill = distill.replace(baseline=cfg.teacher is None)
    return cfg.replace(data=data, distill=distill, export=EXPORT_OPTIONS.config(kw), quantize=QUANTIZE_OPTIONS.config(kw))


_config_from = pipeline_config  # its former name


# --- commands -----------------------------------------------------------------------------------------------------
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
    from . import api

    cfg = pipeline_config(kw)
    out = kw["out"] or _default_out()
    _log_to_after_create(out, cfg)
    rep = api.compress(cfg, out, **PIPELINE_RUN.config(kw))
    api.print_report(rep)
    click.echo(f"report: {_q(out / 'report.md')}, {_q(out / 'report.html')} and {_q(out / 'report.json')}")


@cli.command("distill")
@pipeline_options
def distill_cmd(**kw):
    """Train the student from the teacher (stage 1)."""
    from ._io import is_writer

    if not is_writer():
        _setup_logging(quiet=True, debug=False)  # `torchrun -m compressor distill …`: one voice, rank 0's
    from . import api

    cfg = pipeline_config(kw)
    out = kw["out"] or _default_out()
    _log_to_after_create(out, cfg)
    run = api.distill(cfg, out, **PIPELINE_RUN.config(kw))
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
    from . import api
    from ._io import is_writer

    if not is_writer():
        _setup_logging(quiet=True, debug=False)  # one voice: rank 0 speaks for the job
    else:
        _log_to(run_dir)
    api.distill(api.run_config(run_dir), run_dir, resume=resume)


def _default_out() -> Path:
    from .run import default_run_dir

    return default_run_dir()


def _log_to_after_create(out: Path, cfg: CompressConfig) -> None:
    """Claim --out as the run folder (new, empty or a run already: compressor.ownership), then log there."""
    from .api import claim_out

    claim_out(cfg, out)
    _log_to(out)


run_dir_arg = click.argument("run_dir", type=click.Path(path_type=Path))


@cli.command("export")
@run_dir_arg
@EXPORT_OPTIONS
@STAGE_RUN
def export_cmd(run_dir, **kw):
    """Export the trained student to ONNX, simplify it, and check every graph against PyTorch (stage 2)."""
    from . import api

    _log_to(run_dir)
    api.export(run_dir, EXPORT_OPTIONS.config(kw, base=lambda: api.run_config(run_dir).export), **STAGE_RUN.config(kw))


@cli.command("quantize")
@run_dir_arg
@QUANTIZE_OPTIONS
@STAGE_RUN
def quantize_cmd(run_dir, **kw):
    """Quantize the ONNX student to INT8 Q/DQ (and FP16), calibrated on your data, within an accuracy tolerance (stage 3)."""
    from . import api

    _log_to(run_dir)
    api.quantize(run_dir, QUANTIZE_OPTIONS.config(kw, base=lambda: api.run_config(run_dir).quantize), **STAGE_RUN.config(kw))


@cli.command("bench")
@run_dir_arg
@BENCH_OPTIONS
@STAGE_RUN
@REMOTE_OPTIONS
def bench_cmd(run_dir, **kw):
    """Measure accuracy, agreement and latency of every variant; write report.json (stage 4)."""
    from . import api

    _log_to(run_dir)
    remote = REMOTE_OPTIONS.config(kw)
    rep = api.bench(run_dir, BENCH_OPTIONS.config(kw, base=lambda: api.run_config(run_dir).bench), **STAGE_RUN.config(kw))
    api.report(run_dir)
    if kw["remote"]:
        rep = api.remote_bench(run_dir, kw["remote"], **remote, min_runs=kw["min_runs"], min_duration_s=kw["min_duration_s"])
    api.print_report(rep)


@cli.command("report")
@run_dir_arg
@click.option("--merge", "merge", type=click.Path(path_type=Path), help="Fold a device's report.json (written by the bundle's run_on_device.py) into the run's report first.")
@click.option("--html", "html", is_flag=True, help="Also write report.html: one self-contained page (table, notes, accuracy-vs-latency plot with the Pareto front). An existing report.html is always re-rendered.")
def report_cmd(run_dir, merge, html):
    """Re-render report.md and the terminal table from report.json (stage 5)."""
    from . import api

    api.print_report(api.report(run_dir, merge=merge, html=html or None))
    click.echo(f"report: {_q(Path(run_dir) / 'report.md')}"
               + (f" and {_q(Path(run_dir) / 'report.html')}" if (Path(run_dir) / "report.html").exists() else ""))


@cli.command("bundle")
@run_dir_arg
@click.option("--out", type=click.Path(path_type=Path), help="Bundle folder (default: RUN_DIR/bundle-<target>); the .tar.gz is written beside it.")
@click.option("--force", is_flag=True, help="Replace an existing bundle folder and tarball.")
def bundle_cmd(run_dir, out, force):
    """Write a deploy bundle for the TensorRT target: ONNX files, manifest, build_engine.sh, run_on_device.py."""
    from . import api

    _log_to(run_dir)
    info = api.bundle(run_dir, out, force=force)
    click.echo(f"bundle: {_q(info['dir'])}\ntarball: {_q(info['tarball'])}\n"
               f"on the device: bash build_engine.sh && python3 run_on_device.py; "
               f"then here: compress report {_q(run_dir)} --merge report.json")


@cli.command("gate")
@click.argument("current", type=click.Path(path_type=Path))
@click.option("--baseline", required=True, type=click.Path(path_type=Path), help="The baseline: a baseline bundle folder (written by --update-baseline; its models are re-timed here), a run directory, or a bare report.json.")
@GATE_OPTIONS
def gate_cmd(current, baseline, **kw):
    """Compare CURRENT (a run directory or report.json) with a baseline: exit 0 pass, 1 regression, 2 bad input, 4 the gate's own error."""
    global _BUG_EXIT
    _BUG_EXIT = EXIT_GATE_BUG  # an internal error must not read as a regression (1) or a pass (0)
    from . import api

    outcome = api.gate_ci(current, baseline, show=api.print_gate_table, **GATE_OPTIONS.config(kw))
    if outcome.baseline_written:
        click.echo(outcome.baseline_written)
    if outcome.exit_code:
        raise click.exceptions.Exit(outcome.exit_code)


@cli.command("targets")
@click.argument("name", required=False)
@click.option("--text", "as_text", is_flag=True, help="With NAME: a readable view (every figure with its source) instead of JSON.")
def targets_cmd(name, as_text):
    """List the device profiles, or show one (JSON; --text for a readable view)."""
    from . import api

    if not name:
        api.print_targets()
        return
    view, warnings = api.show_target(name, text=as_text)
    for line in warnings:
        click.echo(f"warning: {printable(line)}", err=True)
    click.echo(printable(view) if as_text else view)


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
    except OSError as exc:
        if exc.errno not in _BAD_PATH_ERRNOS:
            return _internal_error(exc, debug)
        _log_trace("error")  # a path the OS refuses (too long, a loop of links) is bad input, wherever it is first used
        click.echo(f"error: {printable(exc.strerror)}: {printable(str(exc.filename or '')[:200])} (give a shorter or valid path)", err=True)
        return 2
    except Exception as exc:  # a bug: keep the trace in the log, show one line unless --debug
        return _internal_error(exc, debug)


_BAD_PATH_ERRNOS = {errno.ENAMETOOLONG, errno.ELOOP}


def _internal_error(exc: BaseException, debug: bool) -> int:
    """A bug: the trace kept in the log, one line shown unless --debug."""
    _log_trace("internal error")
    if debug:
        traceback.print_exc()
    click.echo(f"internal error: {type(exc).__name__}: {printable(exc)} (rerun with --debug for the traceback; please report it)", err=True)
    return _BUG_EXIT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
