"""`--student auto --budget …`: a student sized to the budget, chosen among a few candidates by a short distillation.

The candidates are
  - the largest member of the data's built-in family within the budget (images: the project's MobileNet-style net,
    models/families.py; token ids: the small transformer; signals: the 1-D conv net; flat rows: the MLP);
  - with timm installed and image data, the largest of a short list of timm's edge models within the budget;
  - the teacher itself, pruned channel by channel with Torch-Pruning's dependency graph (models/prune.py), distilled
    from the unpruned teacher between pruning steps, when the teacher's architecture is known (an eager module: a state
    dict with --teacher-arch, or a --trust pickle);
  - for a teacher made of a stack of repeated blocks, every other block dropped first (teacher:every-other) and the
    rest pruned to the budget when dropping blocks alone does not meet it.
Each is trained for the same short number of steps from the teacher's cached outputs and scored on the validation
split carved from the labeled training rows; the best is trained in full by the distill stage. `--student
teacher:pruned` takes the pruning path alone. A latency budget is measured with ONNX Runtime on this host when the
target is this host's CPU, and otherwise estimated with the target's roofline (and labelled so).
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CompressError
from ..log import say

AUTO_SPECS = ("auto", "teacher:pruned")
DEFAULT_BUDGET = ["params=0.1"]
PRUNE_STEPS = 8  # pruning steps at most; each followed by a short distillation from the unpruned teacher
# a latency budget is sized to 90% of the limit: measured latencies vary by a few percent between runs, and each
# candidate is measured again (against the limit itself) before it is scored
LATENCY_HEADROOM = 0.9


def budget_of(dcfg):
    """The Budget --budget gives, or the default (params=0.1, marked as such in its errors)."""
    import dataclasses

    from ..models.budget import parse_budget

    return parse_budget(dcfg.budget) if dcfg.budget else dataclasses.replace(parse_budget(DEFAULT_BUDGET), default=True)


def wanted(dcfg) -> bool:
    return dcfg.student in AUTO_SPECS


def auto_steps(dcfg, full_steps: int) -> int:
    """Steps each candidate is distilled for before it is scored (default: a tenth of the full run, 100 to 1000)."""
    return int(dcfg.auto_steps) if dcfg.auto_steps else max(100, min(1000, full_steps // 10))


@dataclass
class Candidate:
    name: str
    kind: str  # family | timm | pruned | depth+pruned
    record: dict
    module: object = None
    params: int = 0
    macs: int = 0
    latency_ms: float | None = None
    val_accuracy: float | None = None
    seconds: float = 0.0
    note: str = ""
    fresh: bool = True  # trained from a fresh initialisation (a family member); pruned ones keep the teacher's weights
    state: dict | None = None  # a pruned winner's weights read back from the run (--resume), where there is no module
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {"name": self.name, "kind": self.kind, "spec": self.record.get("spec") if self.record else None,
                "params": self.params, "macs": self.macs, "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 4),
                "val_accuracy": self.val_accuracy, "seconds": round(self.seconds, 2), "note": self.note, **self.extra}


# --- measuring ------------------------------------------------------------------------------------------------------------
class Meter:
    """Counts parameters and MACs of modules on one row of the data, and their latency on the target when the
    budget has one (measured with ONNX Runtime on this host, or the roofline's estimate for another target)."""

    def __init__(self, target: dict, x, limits: dict):
        from ..targets import host_mismatches

        self.x, self.limits, self.target = x[:2], limits, target
        profile = target
        self.measured = bool(profile.get("is_host")) or (profile["kind"] == "cpu" and not host_mismatches(profile))
        self.latency_kind = "measured (ONNX Runtime FP32, batch 1, 1 thread, this host)" if self.measured else \
            f"estimated (roofline, INT8, {profile['name']})"
        if "latency_ms" in limits:
            check_latency_target(profile)

    def counts(self, module) -> tuple[int, int]:
        from ..models.budget import count

        return count(module, self.x)

    def latency(self, module) -> float:
        """Milliseconds per row on the target: the p50 over half a second of batch-1 runs (measured) or the roofline.
        Under torchrun rank 0 measures and the others take its figure, so every rank picks the same student."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [self._latency(module) if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(box, src=0)
            return float(box[0])
        return self._latency(module)

    def _latency(self, module) -> float:
        import numpy as np

        from ..export.onnx_io import export_onnx, make_session

        x = np.ascontiguousarray(self.x[:1])
        with tempfile.TemporaryDirectory(prefix="compressor-auto-") as d:
            path = Path(d) / "m.onnx"
            was = module.training
            module.eval()
            try:
                export_onnx(module, np.ascontiguousarray(self.x), path, self.target["runtime"]["onnx_opset"], optimize=False)
            finally:
                module.train(was)
            if not self.measured:
                from ..bench.roofline import estimate, roofline_figures

                return float(estimate(path, roofline_figures(self.target, "int8"), "int8")["latency_ms"])
            from ..bench.latency import measure

            sess = make_session(path, threads=1)
            name = sess.get_inputs()[0].name
            return float(measure(lambda: sess.run(None, {name: x}), warmup_ms=100, min_runs=50, min_duration_s=0.5)["p50"])

    def fill(self, module) -> float:
        """The fraction of the params/MACs budget a module uses (the larger of the two)."""
        params, macs = self.counts(module)
        return max(params / self.limits.get("params", math.inf), macs / self.limits.get("macs", math.inf))

    def fits(self, module, cand: Candidate | None = None) -> bool:
        params, macs = self.counts(module)
        ok = params <= self.limits.get("params", math.inf) and macs <= self.limits.get("macs", math.inf)
        lat = None
        if ok and "latency_ms" in self.limits:
            lat = self.latency(module)
            ok = lat <= LATENCY_HEADROOM * self.limits["latency_ms"]
        if cand is not None:
            cand.params, cand.macs, cand.latency_ms = params, macs, lat
        return ok


# --- building the candidates -------------------------------------------------------------------------------------------
def _family_candidate(meter: Meter, ds, num_classes: int, ctx: dict, seed: int) -> Candidate:
    import torch

    from ..models.families import KNOB_RANGE, family_for, family_kwargs, largest_within
    from ..models.student import load_student

    family = family_for(tuple(ds.input_shape), bool(ctx.get("vocab_size")))

    def record_at(knob):
        return {"spec": f"builtin:{family}", "kwargs": {"input_shape": list(ds.input_shape), "num_classes": num_classes,
                                                         **family_kwargs(family, knob, ctx)}}

    def build(knob):
        return load_student(record_at(knob))

    lo, hi = KNOB_RANGE[family]
    knob = largest_within(build, meter.fits, lo, hi, iters=10 if "latency_ms" in meter.limits else 14)
    if knob is None:
        return Candidate(f"builtin:{family}", "family", {}, note=f"even its smallest member ({lo:g}) is over the budget")
    record = record_at(knob)
    torch.manual_seed(seed)
    cand = Candidate(f"builtin:{family} ({_knob_text(record['kwargs'])})", "family", record)
    cand.module = load_student(record)
    meter.fits(cand.module, cand)
    return cand


def _knob_text(kw: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in kw.items() if k in ("width", "depth", "layers"))


def _timm_candidate(meter: Meter, ds, num_classes: int, seed: int) -> Candidate | None:
    """The largest of timm's edge models within the budget (images only; None without timm)."""
    import importlib.util

    import torch

    if len(ds.input_shape) != 3 or importlib.util.find_spec("timm") is None:
        return None
    from ..models.families import TIMM_IMAGE_MODELS
    from ..models.student import load_student

    best = None
    for name in TIMM_IMAGE_MODELS:
        record = {"spec": f"timm:{name}", "kwargs": {"input_shape": list(ds.input_shape), "num_classes": num_classes}}
        torch.manual_seed(seed)
        cand = Candidate(f"timm:{name}", "timm", record, module=load_student(record))
        if meter.fits(cand.module, cand) and (best is None or cand.macs > best.macs):
            best = cand
    return best or Candidate("timm", "timm", {}, note="no timm edge model is within the budget")


def eager_teacher_or_why(teacher):
    """(the teacher's eager nn.Module, None) or (None, why it cannot be pruned)."""
    from ..models.student import eager_teacher

    try:
        return eager_teacher("teacher:pruned", teacher), None
    except CompressError as exc:
        return None, exc.message


# --- training and scoring ----------------------------------------------------------------------------------------------
class Trainer:
    """Short distillations of candidates from the teacher's cached outputs, scored on the validation split."""

    def __init__(self, run, dcfg, split, pool_logits, steps: int):
        from ..data.streaming import take

        self.run, self.dcfg, self.split, self.steps = run, dcfg, split, steps
        self.x, self.y = take(run.data.x, split.train_rows), run.data.y[split.train_rows]
        self.tlogits = take(pool_logits, split.train_rows)
        self.ckpt = run.path("auto/candidate.ckpt")

    def train(self, module, steps: int, label: str) -> float:
        from .trainer import train_student

        cfg = self.dcfg.replace(augment="none", mixup=0.0, cutmix=0.0, hint=None, evals=max(2, min(self.dcfg.evals, 10)))
        try:
            module, res = train_student(module, self.x, self.y, self.tlogits, self.split.x_val, self.split.y_val, cfg,
                                        steps=steps, checkpoint=self.ckpt, label=label, loss_name=self.dcfg.loss)
        finally:
            self.ckpt.unlink(missing_ok=True)
        return float(res.best_val_accuracy)


def _pruned_candidate(run, meter: Meter, source, trainer: Trainer, *, depth: bool) -> Candidate:
    """The teacher (or its every-other-block cut) pruned to the budget, distilled between pruning steps."""
    import torch

    from ..models.prune import arch_record, prune_to_budget
    from ..models.student import cut_every_other

    kind = "depth+pruned" if depth else "pruned"
    t0 = time.perf_counter()
    depth_kw = None
    if depth:
        base, depth_kw = cut_every_other(source)
    else:
        base = copy.deepcopy(source).cpu()
    original = copy.deepcopy(base)
    for p in base.parameters():
        p.requires_grad_(True)
    cand = Candidate("teacher, every other block, pruned" if depth else "teacher, pruned", kind, {}, fresh=False)
    between_steps = max(20, trainer.steps // PRUNE_STEPS)
    prune_info = {"steps": 0}
    if not meter.fits(base, cand):
        ex = torch.from_numpy(meter.x)

        def between(model, step):
            trainer.train(model, between_steps, f"{kind} step {step + 1}")

        fill = meter.fill if ("params" in meter.limits or "macs" in meter.limits) else None
        prune_info = prune_to_budget(base, ex, lambda m: meter.fits(m), steps=PRUNE_STEPS, between=between,
                                     log=lambda msg: say(f"auto: {msg}"), fill=fill)
    meter.fits(base, cand)
    cand.module = base
    cand.record = {"spec": "teacher:pruned", "kwargs": {"depth": depth_kw, "arch": arch_record(base, original),
                                                         "teacher_class": type(source).__name__, "params": cand.params, "macs": cand.macs}}
    cand.extra = {"prune_steps": int(prune_info.get("steps", 0)), "round_to": prune_info.get("round_to")}
    cand.seconds = time.perf_counter() - t0
    return cand


def _still_fits(meter: Meter, cand: Candidate) -> bool:
    """Measured latencies vary: a candidate is measured again before it is scored, and dropped when it is over."""
    if "latency_ms" not in meter.limits:
        return True
    lat = meter.latency(cand.module)
    cand.latency_ms = lat
    if lat <= meter.limits["latency_ms"]:
        return True
    cand.note = f"dropped: measured again at {lat:.3f} ms, over the budget"
    return False


def _preflight(run, cand: Candidate) -> bool:
    """A candidate that cannot export or quantize is dropped (its reason in the table)."""
    if not run.config.preflight:
        return True
    from ..export.preflight import preflight

    try:
        preflight(cand.module, run.data.x[:8], run.target, run.config.export.opset, run.config.quantize.recipe)
    except CompressError as exc:
        cand.note = f"dropped: {exc}"[:300]
        return False
    return True


def choose(run, dcfg, teacher, ds, num_classes: int, split, pool_logits, full_steps: int, ctx: dict, resume: bool = False):
    """Build, train briefly and score the candidates; returns (make, the stage result's 'auto' section).
    make(num_classes, fresh=False) gives the winner: a family member freshly initialised, a pruned teacher with its
    pruned weights (fresh=True: the same architecture reinitialised, for the labels-only baseline). The choice is saved
    in the run (auto/choice.json, auto/winner.pt) as soon as it is made: --resume after an interrupt in the full
    training reuses it instead of choosing again."""
    import numpy as np

    from .._io import sha256_json
    from ..models.budget import teacher_macs

    budget = budget_of(dcfg)
    key = sha256_json({"inputs": run.manifest["inputs"], "config": run.manifest["config"], "num_classes": num_classes, "steps": full_steps})
    if resume:
        saved = _saved_choice(run, key)
        if saved is not None:
            say(f"auto: --resume reuses this run's choice, {saved[1]['winner']}")
            return _make_for(saved[0], teacher), saved[1]
    x = np.ascontiguousarray(ds.x[:2])
    t_params, t_macs = teacher.num_params(), teacher_macs(teacher, x)
    limits = budget.limits(t_params, t_macs)
    meter = Meter(run.target, x, _capped(limits, t_params, t_macs))
    trainer = Trainer(run, dcfg, split, pool_logits, auto_steps(dcfg, full_steps))
    say(f"auto: budget {budget.text()} -> {_limits_text(limits)}; teacher {t_params:,} params, "
        f"{'?' if t_macs is None else f'{t_macs:,}'} MACs; each candidate distilled {trainer.steps} steps")
    cands, skipped = _candidates(run, dcfg, teacher, ds, num_classes, ctx, meter, trainer)
    winner = _score(run, dcfg, cands, trainer, meter, budget)
    info = {"budget": budget.to_dict(), "budget_text": budget.text(), "limits": limits, "teacher_params": t_params, "teacher_macs": t_macs,
            "latency": meter.latency_kind if "latency_ms" in limits else None, "steps_per_candidate": trainer.steps,
            "candidates": [dict(c.row(), won=c is winner) for c in cands], "skipped": skipped, "winner": winner.name}
    _save_choice(run, key, winner, info)
    return _make_for(winner, teacher), info


def _candidates(run, dcfg, teacher, ds, num_classes, ctx, meter, trainer) -> tuple[list, list]:
    """The candidates --student asks for (auto: family, timm, pruned, every-other + pruned; teacher:pruned: pruned),
    and a line for each path not tried."""
    cands, skipped = [], []
    if dcfg.student == "auto":
        cands.append(_family_candidate(meter, ds, num_classes, ctx, dcfg.seed))
        timm = _timm_candidate(meter, ds, num_classes, dcfg.seed)
        if timm is not None:
            cands.append(timm)
        else:
            skipped.append("timm's models: timm is not installed" if len(ds.input_shape) == 3 else "timm's models: they take images only")
    source, why = eager_teacher_or_why(teacher)
    if source is None:
        if dcfg.student == "teacher:pruned":
            raise CompressError(why, hint=PRUNE_HINT)
        skipped.append(f"pruning the teacher: {why}")
        return cands, skipped
    from ..models.student import find_block_stack

    alone = dcfg.student == "teacher:pruned"
    cands.append(_try_pruned(run, meter, source, trainer, depth=False, alone=alone))
    stack = find_block_stack(source)
    if stack is not None and stack[1] >= 4:
        cands.append(_try_pruned(run, meter, source, trainer, depth=True, alone=alone))
    else:
        skipped.append("dropping blocks: the teacher has no stack of 4 or more repeated blocks")
    return cands, skipped


def _try_pruned(run, meter, source, trainer, *, depth: bool, alone: bool) -> Candidate:
    """A pruned candidate, or (with other candidates beside it) one dropped with the reason pruning failed."""
    try:
        return _pruned_candidate(run, meter, source, trainer, depth=depth)
    except CompressError as exc:
        if alone and not depth:
            raise
        name = "teacher, every other block, pruned" if depth else "teacher, pruned"
        say(f"auto: {name}: dropped ({exc.message})")
        return Candidate(name, "depth+pruned" if depth else "pruned", {}, note=f"dropped: {exc.message}"[:300], fresh=False)


def _score(run, dcfg, cands: list, trainer: Trainer, meter: Meter, budget) -> Candidate:
    """Each candidate that exports and quantizes, distilled trainer.steps steps and scored on the validation split; the
    best (ties: fewer MACs)."""
    import torch

    for cand in cands:
        if cand.module is None or not _preflight(run, cand) or not _still_fits(meter, cand):
            continue
        t0 = time.perf_counter()
        torch.manual_seed(dcfg.seed)
        cand.val_accuracy = trainer.train(cand.module, trainer.steps, f"candidate {cand.name}")
        cand.seconds += time.perf_counter() - t0
        say(f"auto: {cand.name}: {cand.params:,} params, {cand.macs:,} MACs -> val acc {cand.val_accuracy:.4f}")
    scored = [c for c in cands if c.val_accuracy is not None]
    if not scored:
        notes = "; ".join(f"{c.name}: {c.note}" for c in cands if c.note) or "no candidate could be built"
        raise CompressError(f"--student {dcfg.student}: no student meets --budget {budget.text()} ({notes})"[:400],
                            hint="raise the budget, or choose a student with --student file.py:factory")
    winner = max(scored, key=lambda c: (c.val_accuracy, -c.macs))
    say(f"auto: {winner.name} wins (val acc {winner.val_accuracy:.4f})")
    return winner


_SAVED_SPECS = ("builtin:", "timm:", "teacher:pruned")  # what a saved choice may name (no user code)


def _save_choice(run, key: str, winner: Candidate, info: dict) -> None:
    from .._io import is_writer, torch_save, write_json

    if not is_writer():
        return
    if not winner.fresh:
        torch_save(winner.module.state_dict(), run.path("auto/winner.pt"))
    write_json(run.path("auto/choice.json"), {"key": key, "record": winner.record, "fresh": winner.fresh, "info": info})


def _saved_choice(run, key: str):
    """(the winner as a Candidate, the 'auto' section) from a choice this run saved with the same key, else None."""
    import json

    import torch

    try:
        saved = json.loads(run.path("auto/choice.json").read_text())
        record, fresh, info = saved["record"], bool(saved["fresh"]), saved["info"]
        if saved.get("key") != key or not str(record.get("spec", "")).startswith(_SAVED_SPECS):
            return None
        cand = Candidate(info["winner"], "saved", record, fresh=fresh)
        if not fresh:
            cand.state = torch.load(run.path("auto/winner.pt"), map_location="cpu", weights_only=True)
        return cand, info
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        return None


def check_auto(run) -> None:
    """What --student auto / teacher:pruned can refuse before the teacher's pass: the budget, a latency budget for a target
    that can neither be measured nor estimated, and pruning a teacher whose architecture is unknown."""
    dcfg = run.config.distill
    budget = budget_of(dcfg)
    if budget.latency_ms is not None:
        check_latency_target(run.target)
    if dcfg.student == "teacher:pruned":
        source, why = eager_teacher_or_why(run.teacher)
        if source is None:
            raise CompressError(why, hint=PRUNE_HINT)


PRUNE_HINT = "pass the teacher as a state dict with --teacher-arch file.py:factory (or --trust a pickle), or use --student auto"


def check_latency_target(profile: dict) -> None:
    """A latency budget is measured on this host when it is the target, else estimated with the target's roofline:
    CompressError for a target that is neither (before any teacher pass)."""
    from ..bench.roofline import roofline_figures
    from ..targets import host_mismatches

    if profile.get("is_host") or (profile.get("kind") == "cpu" and not host_mismatches(profile)):
        return
    if roofline_figures(profile, "int8") is None:
        raise CompressError(f"--budget latency_ms cannot be measured or estimated for target '{profile.get('name')}': this host is not it "
                            f"and its profile gives no INT8 peak and memory bandwidth for the roofline", hint="give a params or macs budget instead")


def family_only(dcfg, ds, teacher, target, ctx) -> dict:
    """The record of the data's built-in family member within the budget (a black-box teacher: nothing to prune, and
    no cached outputs to score candidates with)."""
    import numpy as np

    from ..models.budget import teacher_macs

    if dcfg.student == "teacher:pruned":
        raise CompressError("--student teacher:pruned needs the teacher's architecture, but this teacher is a black box",
                            hint="use --student auto (a built-in family member sized to --budget)")
    budget = budget_of(dcfg)
    x = np.ascontiguousarray(ds.x[:2])
    t_params, t_macs = teacher.num_params(), teacher_macs(teacher, x)
    limits = _capped(budget.limits(t_params, t_macs), t_params, t_macs)
    if "latency_ms" in limits and target is None:
        raise CompressError("--budget latency_ms needs a target to measure on", hint="give a params or macs budget")
    cand = _family_candidate(Meter(target or {"kind": "none", "name": "none", "runtime": {}}, x, limits), ds, ds.num_classes, ctx, dcfg.seed)
    if cand.module is None:
        raise CompressError(f"--student auto: {cand.name}: {cand.note} (--budget {budget.text()})", hint="raise the budget")
    say(f"auto: {cand.name}: {cand.params:,} params, {cand.macs:,} MACs (black-box teacher: the built-in family only)")
    return cand.record


def _capped(limits: dict, t_params: int | None, t_macs: int | None) -> dict:
    """The limits candidates are sized to: the budget's, and never more parameters or MACs than the teacher has (a
    latency budget alone would otherwise let a family grow past the teacher)."""
    out = dict(limits)
    if t_params:
        out["params"] = min(out.get("params", t_params), t_params)
    if t_macs:
        out["macs"] = min(out.get("macs", t_macs), t_macs)
    return out


def _limits_text(limits: dict) -> str:
    from ..models.budget import human

    return ", ".join(f"{k} <= {v:g}" if k == "latency_ms" else f"{k} <= {human(v)}" for k, v in limits.items())


def _make_for(winner: Candidate, teacher):
    from ..models.student import load_student

    state = None if winner.fresh else winner.state if winner.state is not None else \
        {k: v.detach().clone() for k, v in winner.module.state_dict().items()}

    def make(num_classes: int, fresh: bool = False):
        if winner.fresh:
            return load_student(winner.record), winner.record
        module = load_student(winner.record, teacher=teacher)
        if fresh:
            from ..models.prune import reinitialise

            return reinitialise(module), winner.record
        module.load_state_dict(state)
        return module, winner.record
    return make
