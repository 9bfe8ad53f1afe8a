"""One small dataclass config per stage; each round-trips through JSON and is embedded in the report."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from .errors import CompressError

CONFIG_VERSION = 1


_KIND_NAMES = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false", dict: "an object"}


def _typed(v, hint, where: str):
    """v checked against a field's type hint (int, float, str, bool, list[X], dict, X | None), returned unchanged;
    a mismatch is a CompressError naming the field."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _typed(v, rest[0], where)
        raise CompressError(f"{where}: no check for the type {hint}")  # pragma: no cover - a new field of a new kind
    if typing.get_origin(hint) is list:
        if not isinstance(v, list):
            raise CompressError(f"{where} must be a list, not {v!r:.80}")
        return [_typed(x, args[0], f"{where}[{i}]") for i, x in enumerate(v)] if args else list(v)
    ok = {int: lambda x: isinstance(x, int) and not isinstance(x, bool),
          float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x),
          str: lambda x: isinstance(x, str), bool: lambda x: isinstance(x, bool), dict: lambda x: isinstance(x, dict)}.get(hint)
    if ok is None:
        raise CompressError(f"{where}: no check for the type {hint}")  # pragma: no cover - a new field of a new kind
    if not ok(v):
        raise CompressError(f"{where} must be {_KIND_NAMES[hint]}, not {v!r:.80}")
    return v  # an int stays an int where a float is expected: the stage fingerprints hash the JSON as written


# Bounds on the whole numbers of a config read from a file (a run's manifest, which may have travelled, or a gate.toml):
# the CLI refuses the same values when it parses them; a field not named here takes DEFAULT_INT_BOUNDS.
INT_BOUNDS = {
    "seed": (0, 2**32 - 1), "threads": (1, 1024), "nproc_per_node": (1, 1024), "batch_size": (1, 1 << 20),
    "eval_batch_size": (1, 1 << 20), "steps": (1, 10**9), "search_steps": (1, 10**9), "qat_steps": (0, 10**9),
    "min_steps": (0, 10**9), "repeat": (1, 1000), "rounds": (5, 1000), "query_rounds": (1, 1000), "search": (0, 10000),
    "opset": (13, 23), "channels": (1, 3), "image_size": (1, 16384), "evals": (1, 10**6), "warmup_runs": (0, 10**7),
    "min_runs": (1, 10**7), "calibration_rows": (1, 10**7), "validation_rows": (1, 10**8), "check_rows": (1, 10**8),
    "max_float_nodes": (0, 100000), "resize": (1, 16384), "crop": (1, 16384), "workers": (0, 256),
}
DEFAULT_INT_BOUNDS = (0, 10**12)


def _bounded(v, name: str, where: str):
    """v (an int or a list of ints, as typed) within INT_BOUNDS[name]; else a CompressError naming the field."""
    low, high = INT_BOUNDS.get(name, DEFAULT_INT_BOUNDS)
    for x in v if isinstance(v, list) else [v]:
        if isinstance(x, int) and not isinstance(x, bool) and not low <= x <= high:
            raise CompressError(f"{where} must be between {low} and {high}, not {x}")
    return v


class _Config:
    """Mixin: to_dict()/from_dict() with a version tag and a clear error on unknown keys."""

    def to_dict(self) -> dict:
        out = {"config_version": CONFIG_VERSION}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, _Config) else (list(v) if isinstance(v, tuple) else v)
        return out

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise CompressError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("config_version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise CompressError(f"{cls.__name__}: config version {version} is not supported (this tool reads {CONFIG_VERSION})")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CompressError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
        kwargs = {}
        for k, v in d.items():
            sub = hints.get(k)
            if isinstance(sub, type) and issubclass(sub, _Config):
                v = sub.from_dict(v)
            else:  # a hand-edited or foreign file: a wrong type fails here, not deep inside a stage
                v = _bounded(_typed(v, sub, f"{cls.__name__}: {k}"), k, f"{cls.__name__}: {k}")
            kwargs[k] = v
        return cls(**kwargs)

    def replace(self, **changes):
        """A copy with the given fields changed; None values are ignored (unset CLI flags)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class DataConfig(_Config):
    """Where the training pool and the held-out set come from."""

    source: str = "mnist1d"  # path to .npz, an image folder, or "mnist1d"
    eval_source: str | None = None  # explicit held-out image folder or .npz
    heldout_fraction: float = 0.2  # used only when the data carries no held-out set
    image_size: list[int] | None = None  # [H, W] for image folders; default: the teacher's or the images' own
    channels: int | None = None  # 1 (grayscale) or 3 (RGB) for image folders
    mean: list[float] | None = None  # per-channel normalisation after scaling pixels to [0, 1]
    std: list[float] | None = None
    max_image_pixels: int | None = 89_478_485  # image folders: larger images (and --image-size) are refused; PIL's Image.MAX_IMAGE_PIXELS
    unlabeled: list[str] | None = None  # image folders without labels (any nesting), added to the training pool with y = -1
    resize: int | None = None  # image folders: shorter side scaled to this, then the centre --crop cut out (ImageNet's eval transform)
    crop: int | None = None  # image folders: the centre crop's side (the images' size is then crop x crop)
    workers: int | None = None  # DataLoader worker processes decoding images (None: the usable cores, at most 8; 0: in the main process)
    mnist1d_samples: int = 55000  # rows generated for the built-in data (80% pool, 20% held out)
    mnist1d_labels: int = 4000  # labeled rows of the pool; the rest are unlabeled (y = -1)
    seed: int = 0


@dataclass
class DistillConfig(_Config):
    """How the student is trained from the teacher (and the labels-only baseline, if asked)."""

    student: str | None = None  # "file.py:factory" | "pkg.mod:factory" | "auto" | "teacher:…" | "builtin:…" | "timm:…" | None (default)
    budget: list[str] | None = None  # --student auto / teacher:pruned: ["params=0.1", "macs=300M", "latency_ms=2"] (default params=0.1)
    auto_steps: int | None = None  # --student auto: steps each candidate is distilled before it is scored (default: a tenth, 100..1000)
    output: str | None = None  # a student returning a tuple or dict: the key or index of its class scores (None: the first)
    loss: str = "dist"  # a registered loss: dist | kd | dkd | labels …; dist won every mnist1d case in benchmarks/results/distill.md
    temperature: float = 4.0  # chosen in benchmarks/results/kd_sweep.md
    alpha: float = 0.5  # weight of the soft-target term on labeled rows; unlabeled rows use it alone
    logit_standardize: bool = False  # kd/dkd: z-score each row's logits before the temperature (Sun et al. 2024)
    dkd_alpha: float = 1.0  # dkd: weight of the target-class term (TCKD)
    dkd_beta: float = 8.0  # dkd: weight of the non-target term (NCKD)
    dist_beta: float = 1.0  # dist: weight of the inter-class (per-row) relation term
    dist_gamma: float = 1.0  # dist: weight of the intra-class (per-class, across the batch) relation term
    hint: str | None = None  # "student.layer=teacher.layer": also match these activations through a learned projection
    hint_weight: float = 1.0
    augment: str = "none"  # none | auto | signal | image: same augmented view for teacher and student (function matching)
    mixup: float = 0.0  # Beta(a, a) mixup across all pool rows (0 = off); with mixup the teacher's outputs are the only target
    cutmix: float = 0.0  # Beta(a, a) cutmix (0 = off); one of mixup/cutmix is drawn per batch when both are on
    teacher_output: str = "auto"  # what the teacher answers: auto (probabilities detected, else logits) | logits | probs | topk:K | label
    query_budget: int | None = None  # cap on teacher calls (rows); spent in rounds on the rows the student is least sure of
    query_rounds: int = 4
    query_strategy: str = "margin"  # margin | entropy: how the next round's rows are picked
    search: int = 0  # trials of a hyper-parameter search on the validation split (0 = off)
    search_steps: int | None = None  # steps per search trial (default: a quarter of the full budget)
    nproc_per_node: int = 1  # >1: DistributedDataParallel over this many local processes (torchrun)
    compile: bool = False  # torch.compile the student (CUDA)
    amp_dtype: str = "bf16"  # bf16 | fp16 for mixed precision on CUDA
    steps: int | None = None  # optimiser steps; default: max(epochs over the pool, min_steps)
    epochs: float = 60.0  # used when steps is None
    min_steps: int = 3000  # short schedules are where KD loses to labels alone (small pools need this floor)
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-2
    warmup_fraction: float = 0.05
    clip_grad_norm: float = 1.0
    val_fraction: float = 0.1  # of labeled training rows, for checkpoint selection (never the held-out set)
    evals: int = 30  # validation points over the run
    baseline: bool = False  # also train the same student on labels alone with the same budget
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # mixed precision on CUDA
    seed: int = 0


@dataclass
class ExportConfig(_Config):
    """ONNX export and its numeric check against PyTorch."""

    opset: int | None = None  # default: the target profile's
    atol: float = 1e-3  # max |onnx - torch| over held-out logits
    min_agreement: float = 0.999  # argmax agreement with PyTorch on held-out rows
    check_rows: int = 2048
    simplify: bool = True  # onnxslim after the export, checked like the export itself (benchmarks/results/export_simplify.md)


@dataclass
class QuantizeConfig(_Config):
    """INT8 (and FP16) flavours of the ONNX student with ONNX Runtime's tools, calibrated on the user's data."""

    recipe: str = "auto"  # auto: the target's; or a registered INT8 recipe name
    calibration_rows: int = 512
    calibrate_method: str = "minmax"  # minmax | entropy | percentile
    per_channel: bool = True
    int8_tolerance: float = 1.0  # accuracy points INT8 may lose against FP32 on the validation split
    max_float_nodes: int = 8  # accuracy-aware mode: at most this many sensitive nodes kept in float (0 = off)
    qat_steps: int = 300  # then quantization-aware distillation for this many steps when INT8 still misses (0 = off)
    exclude_nodes: list[str] | None = None  # nodes to keep in float from the start (by ONNX node name)
    fp16: bool | None = None  # also an FP16 model (default: when the target lists fp16)
    keep_io_fp32: bool = True  # FP16 model takes and returns float32
    validation_rows: int = 2048
    seed: int = 0


@dataclass
class GateConfig(_Config):
    """compress gate's thresholds (a gate.toml holds the same keys; floors as [[floor]] tables)."""

    max_accuracy_drop: float = 0.5  # accuracy points a model may lose against the baseline
    min_agreement: float | None = None  # fraction of held-out rows a student must agree with the teacher on
    max_latency_regression: float = 0.10  # fraction a latency (best round, re-timed here) may grow
    max_size_growth: float = 0.10  # fraction a file may grow
    absolute_latency: bool = False  # compare the reports' p50s instead of re-timing (same host only)
    alpha: float = 0.05  # significance of the one-sided test on the rounds (Wilcoxon signed-rank re-timed; Mann-Whitney U from reports)
    rounds: int = 7  # re-timing: interleaved rounds per model and side (7 paired rounds: smallest one-sided p = 1/128)
    round_duration_s: float = 0.2  # re-timing: seconds each model is timed in each round
    models: list[str] | None = None  # gate only these (names or role/format/precision); default every baseline model
    floors: list[dict] | None = None  # [{"model": "student onnx int8", "metric": "accuracy", "min": 0.93}]


@dataclass
class BenchConfig(_Config):
    """Accuracy on the full held-out set and batch-1 latency on this host."""

    threads: int = 1  # batch-1 latency of small models; 1 thread is also what stays stable on a shared machine
    batch_size: int = 1
    warmup_ms: float = 200.0
    warmup_runs: int = 10
    min_runs: int = 200
    min_duration_s: float = 1.0
    eval_batch_size: int = 1024
    repeat: int = 3  # latency measured in this many interleaved rounds over all models: p50 is their median, a spread
    # above 5% flags the measurement as noisy, and compress gate tests the rounds (3 rounds of >= 1 s: trtexec's >= 3 s)
    batch_sweep: list[int] | None = None  # e.g. [1, 8, 32]: also time the ONNX models at these batch sizes (throughput)
    providers: str = "cpu"  # ONNX Runtime execution providers for the ONNX models: cpu | cuda | tensorrt | auto (best present)


@dataclass
class CompressConfig(_Config):
    """The whole pipeline: inputs plus one config per stage."""

    teacher: str | None = None  # None: the built-in demo teacher (with data "mnist1d")
    teacher_arch: str | None = None
    trust: bool = False
    preflight: bool = True  # export and quantize the untrained student before any training step (--skip-preflight)
    target: str = "jetson"
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
