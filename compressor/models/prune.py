"""The teacher itself, structurally pruned to a size budget (`--student auto`'s "teacher, pruned" candidate), and the
record that rebuilds a pruned architecture from an unpruned copy of the teacher.

Pruning is Torch-Pruning's (1.6.x): its dependency graph, traced with autograd on one example row, couples every
layer whose channels must shrink together (a residual add, a torch.cat, a grouped or depthwise conv, a norm, an
attention's heads, a learned position embedding), and its pruner removes the channels of lowest group magnitude
(GroupMagnitudeImportance, L2), each layer by the same fraction, in `steps` equal steps up to `max_ratio`. What is
done around it, and why:

- The classifier head (every Linear/Conv that makes one of the model's outputs) is never pruned: the number of
  classes must not change.
- nn.MultiheadAttention keeps its number of heads and loses dimensions within each head alike (Torch-Pruning's
  `num_heads`, `prune_head_dims=True`, `prune_num_heads=False`); its embedding width is the model's width, so the
  whole residual stream shrinks with it. Each attention gets its own ranking scope (a `pruning_ratio_dict` entry):
  without it Torch-Pruning files the attention's group under the name of the next Linear, the MLP's hidden group
  overwrites it, and the model's width is never pruned.
- Parameters that belong to no layer Torch-Pruning knows (a learned position embedding or class token of shape
  (1, L, d), a layer scale) are pruned along their last dimension longer than one when that dimension is a layer
  width of the model; others are left alone.
- Kept widths are multiples of `round_to` (INT8 kernels want multiples of 8), rounded to the nearest multiple rather
  than down, per channel group (a 4-head attention of width 32 keeps 2, 4 or 6 dimensions per head); a layer not wider
  than `round_to` is left alone. Torch-Pruning's own rounding counts the channels of one group against the width of
  all groups and empties every head at its first step. Where a residual add joins a torch.cat's output, Torch-Pruning
  picks channels across the whole concatenation, so the branches keep a multiple of round_to together, not each.
- Before the model is touched, a dry run on a copy prunes step by step and checks that the copy still runs on the
  example and gives outputs of the same shapes; a group of layers after whose pruning it does not (hand-written
  attention that splits a Linear's output into heads with a fixed count, as F.scaled_dot_product_attention models
  do, or any layer whose width the code fixes) is kept whole and the dry run starts again. The dry run also finds
  whether the budget can be met at all, so a hopeless budget fails before any distillation time is spent.
"""
from __future__ import annotations

import copy
import functools
import math
import warnings

from ..errors import CompressError

_HINT = "give a larger --budget, or let --student auto pick a smaller architecture instead of the pruned teacher"
_TRACE_HINT = "name a student architecture with --student instead of pruning the teacher"
_NUMBER = (bool, int, float)


def prune_to_budget(model, example, fits, *, steps=8, max_ratio=0.9, round_to=8, between=None, log=None, fill=None) -> dict:
    """Prune `model` (an eager nn.Module) IN PLACE until `fits(model)` is true, in at most `steps` Torch-Pruning steps
    of a linear schedule up to `max_ratio` of each layer's channels; `between(model, step)` (step counted from 0) runs
    after each step (the caller distils there: parameters are new objects after every step, so an optimizer must be
    made anew). `example` is a batch the model takes (float rows or int64 token ids); fits() is also called on
    pruned copies during the dry run. Returns a JSON-safe summary: steps, ratio (the schedule's fraction of each
    layer's channels pruned, before rounding to round_to), params_before/after, macs_before/after, heads (the output
    layers, never pruned), kept_whole (layers and parameters left unpruned so the model stays correct), round_to (the
    multiple used: smaller than asked when fill(model), the fraction of the budget a model uses, shows that the asked
    multiple would leave a narrow model well under its budget). CompressError, with the model untouched, when the
    budget cannot be met at `max_ratio`."""
    import torch

    from .budget import count

    _require_torch_pruning()
    log = log or (lambda msg: None)
    x = torch.as_tensor(example[:1]).to(_device(model))
    params0, macs0 = count(model, x)
    info = {"steps": 0, "ratio": 0.0, "params_before": params0, "macs_before": macs0, "params_after": params0,
            "macs_after": macs0, "heads": [], "kept_whole": []}
    if fits(model):
        return info
    opts = {"steps": int(steps), "max_ratio": float(max_ratio), "round_to": int(round_to or 1)}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    plan = _plan(model, x, fits, opts, (params0, macs0))
    opts.update(_tight_schedule(model, x, fits, opts, plan, fill))
    info["round_to"] = opts["round_to"]
    info.update(heads=sorted(plan["heads"]), kept_whole=sorted(plan["ignored"] + plan["kept_params"]))
    if info["kept_whole"]:
        log(f"pruning keeps {len(info['kept_whole'])} layer(s) whole so the model stays correct: {', '.join(info['kept_whole'][:8])}")
    pruner = _pruner(model, x, opts, plan)
    for step in range(opts["steps"]):
        _real_step(pruner, model, x, plan["shapes"], step)
        _freeze(model, frozen)
        if between is not None:
            between(model, step)
            x = x.to(_device(model))
        params, macs = count(model, x)
        info.update(steps=step + 1, ratio=round(opts["max_ratio"] * (step + 1) / opts["steps"], 6), params_after=params, macs_after=macs)
        log(f"pruning step {step + 1}/{opts['steps']}: {info['ratio']:.0%} of channels pruned, "
            f"{params / max(params0, 1):.0%} of the parameters and {macs / max(macs0, 1):.0%} of the MACs left")
        if fits(model):
            return info
    raise _short((info["params_after"], info["macs_after"]), (params0, macs0), opts, plan)


def _require_torch_pruning():
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        raise CompressError("pruning the teacher needs Torch-Pruning, which is not installed", hint="pip install 'torch-pruning>=1.6,<1.7'") from None


def _real_step(pruner, model, x, shapes, step):
    """One step on the caller's model; it must still run (the dry run says it will)."""
    try:
        _step(pruner)
        ok = _runs(model, x, shapes)
    except Exception as exc:
        raise CompressError(f"pruning step {step + 1} failed: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}", kind="runtime") from None
    if not ok:
        raise CompressError(f"pruning step {step + 1} left {type(model).__name__} unable to run", kind="runtime")


def _device(model):
    import torch

    return next(iter(model.parameters()), torch.empty(0)).device


def _freeze(model, names):
    """Parameters that did not require grad before pruning do not again (pruning replaces the parameter objects)."""
    params = dict(model.named_parameters())
    for name in names:
        if name in params:
            params[name].requires_grad_(False)


def _short(after, before, opts, plan) -> CompressError:
    """The error for a budget not met at max_ratio: how far pruning got, and how many layers it had to keep whole."""
    kept = len(plan["ignored"]) + len(plan["kept_params"])
    return CompressError(f"pruning could not meet the budget at {opts['max_ratio']:.0%} of the channels: "
                         f"{after[0] / max(before[0], 1):.0%} of the parameters and {after[1] / max(before[1], 1):.0%} of the MACs left"
                         + (f", {kept} layer(s) kept whole to keep the model correct" if kept else ""), hint=_HINT)


def _plan(model, x, fits, opts, before) -> dict:
    """What to prune: {"heads": output layers, "ignored": layers to keep whole, "dims": {loose parameter: dimension},
    "kept_params": loose parameters to leave alone, "shapes": the output shapes}, from dry runs on copies of `model` (see
    the module's docstring). CompressError when the budget cannot be met or the model cannot be pruned correctly."""
    dims, kept = _loose_params(model)
    plan = {"heads": _heads(model, x), "ignored": [], "dims": dims, "kept_params": kept, "shapes": _output_shapes(model, x)}
    broken = CompressError(f"{type(model).__name__} does not run after Torch-Pruning prunes it", hint=_TRACE_HINT)
    for _ in range(len(dims) + sum(1 for _ in model.modules()) + 1):  # each round keeps one more group whole
        outcome = _dry_run(model, x, fits, opts, plan, per_group=False)
        if outcome == "fits":
            return plan
        if isinstance(outcome, tuple):
            raise _short(outcome, before, opts, plan)
        culprit = _dry_run(model, x, fits, opts, plan, per_group=True)
        if not isinstance(culprit, list):
            raise broken
        modules = [n for n in culprit[0] if n not in plan["ignored"] + plan["heads"]]
        params = [n for n in culprit[1] if n in plan["dims"]]
        if not modules and not params:
            raise broken
        plan["ignored"] += modules
        for name in params:
            plan["kept_params"].append(name)
            plan["dims"].pop(name)
    raise broken


def _tight_schedule(model, x, fits, opts, plan, fill=None) -> dict:
    """{max_ratio, round_to}: the schedule's end at the smallest ratio that fits. fill(model), when given, says how much
    of the budget a model uses (0..1): on a narrow model, multiples of round_to move the size in coarse steps (a
    32-wide layer rounded to 8 can only keep 24, 16 or 8), so when the pruned copy would use less than 90% of the
    budget, smaller multiples (4, 2, 1) are tried and the one that comes closest is kept."""
    best = None
    r = opts["round_to"]
    while r >= 1:
        o = dict(opts, round_to=r)
        ratio = _tight_ratio(model, x, fits, o, plan)
        if fill is None:
            return {"max_ratio": ratio, "round_to": r}
        trial = copy.deepcopy(model)
        _step(_pruner(trial, x, dict(o, steps=1, max_ratio=ratio), plan))
        used = float(fill(trial)) if fits(trial) else 0.0
        if best is None or used > best[0]:
            best = (used, {"max_ratio": ratio, "round_to": r})
        if used >= 0.9:
            break
        r //= 2
    return best[1]


def _tight_ratio(model, x, fits, opts, plan, iters: int = 7) -> float:
    """The smallest fraction of channels (to 1/2**iters of max_ratio) whose one-shot pruning of a copy fits the budget:
    the schedule then ends there, so the pruned model lands just under the budget instead of a whole step past it
    (the widths a ratio leaves do not depend on the steps taken to reach it)."""
    lo, hi = 0.0, opts["max_ratio"]
    for _ in range(iters):
        mid = (lo + hi) / 2
        if _dry_run(model, x, fits, dict(opts, steps=1, max_ratio=mid), plan, per_group=False) == "fits":
            hi = mid
        else:
            lo = mid
    return hi


def _dry_run(model, x, fits, opts, plan, per_group):
    """Prune a copy of `model` step by step: "fits" once fits(copy); (params, macs) when all steps leave it too big;
    "broken" when a step leaves it unable to run, or with per_group, [module names, parameter names] pruned by the
    first group after which it cannot."""
    from .budget import count

    trial, shapes = copy.deepcopy(model), plan["shapes"]
    pruner = _pruner(trial, x, opts, plan)
    for _ in range(opts["steps"]):
        try:
            group = _step(pruner, (lambda: _runs(trial, x, shapes)) if per_group else None)
        except Exception:  # Torch-Pruning failed between groups: only a step-by-step run can say where
            return "broken"
        if group is not None:
            return _pruned_names(trial, pruner, group)
        if not per_group and not _runs(trial, x, shapes):
            return "broken"
        if fits(trial):
            return "fits"
    return count(trial, x)


def _step(pruner, check=None):
    """One pruning step, group by group (groups that prune nothing after rounding are skipped); the first group after
    which check() is false, or None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for group in pruner.step(interactive=True):
            if len(group[0].idxs) == 0:
                continue
            if check is None:
                group.prune()
                continue
            try:
                group.prune()
            except Exception:
                return group
            if not check():
                return group
    return None


def _pruned_names(model, pruner, group) -> list:
    """[names of the modules whose outputs the group prunes, names of the loose parameters it prunes]."""
    names = {id(m): n for n, m in model.named_modules()}
    pnames = {id(p): n for n, p in model.named_parameters()}
    modules, params = [], []
    for dep, _ in group:
        if pruner.DG.is_out_channel_pruning_fn(dep.handler):
            target = dep.target.module
            if id(target) in names:
                modules.append(names[id(target)])
            elif id(target) in pnames:
                params.append(pnames[id(target)])
    return [modules, params]


def _pruner(model, x, opts, plan):
    """A Torch-Pruning pruner for `model` under `plan` (names resolved on this model); the model's train/eval mode
    and its parameters' requires_grad are kept (Torch-Pruning's tracing needs grad and leaves the model in eval)."""
    import torch.nn as nn
    import torch_pruning as tp

    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    kwargs = dict(
        importance=tp.importance.GroupMagnitudeImportance(), iterative_steps=opts["steps"], pruning_ratio=opts["max_ratio"],
        round_to=opts["round_to"] if opts["round_to"] > 1 else None,
        ignored_layers=[modules[n] for n in plan["heads"] + plan["ignored"]] + [params[n] for n in plan["kept_params"]],
        num_heads={m: m.num_heads for m in attention}, prune_head_dims=True, prune_num_heads=False,
        pruning_ratio_dict={m: opts["max_ratio"] for m in attention} or None,
        unwrapped_parameters=[(params[n], d) for n, d in plan["dims"].items()],
        forward_fn=lambda m, inputs: m(inputs), output_transform=_tensors,
        in_channel_groups={}, out_channel_groups={})  # fresh: Torch-Pruning updates its shared default dicts in place
    training = model.training
    frozen = [n for n, p in params.items() if not p.requires_grad]
    try:
        for p in params.values():
            p.requires_grad_(True)  # Torch-Pruning traces the graph with autograd
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = _pruner_class()(model, x, **kwargs)
    except Exception as exc:
        raise CompressError(f"Torch-Pruning cannot trace {type(model).__name__}: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}",
                            hint=_TRACE_HINT) from None
    finally:
        model.train(training)
        _freeze(model, frozen)
    return pruner


@functools.cache
def _pruner_class():
    """tp.pruner.BasePruner with round_to applied per channel group and to the nearest multiple (see _pruned_count).
    Torch-Pruning 1.6 asks _is_atten_group(group) just before _round_to for the same group, which is where the
    group's number of channel groups is noted."""
    import torch_pruning as tp

    class Pruner(tp.pruner.BasePruner):
        channel_groups = 1

        def _is_atten_group(self, group):
            self.channel_groups = self._get_channel_groups(group)
            return super()._is_atten_group(group)

        def _round_to(self, n_pruned, current_channels, round_to):
            return _pruned_count(n_pruned, current_channels, round_to, self.channel_groups)

    return Pruner


def _pruned_count(n_pruned, current, round_to, groups) -> int:
    """Channels to prune in each of `groups` equal channel groups (heads, conv groups) of a layer `current` wide,
    asked to prune `n_pruned` of each: each group keeps the nearest multiple of round_to / gcd(round_to, groups) (at
    least one), so the layer keeps a multiple of round_to; 0 for a group not wider than that."""
    groups = groups if groups > 0 and current % groups == 0 else 1
    per = current // groups
    unit = round_to // math.gcd(round_to, groups)
    if per <= unit:
        return 0
    keep = max(unit, int((per - n_pruned) / unit + 0.5) * unit)
    return max(per - keep, 0)


def _tensors(out) -> list:
    """The tensors in a model's output (a tensor, or tuples / lists / dicts of them), in order."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _output_shapes(model, x) -> list:
    """The shapes of the model's output tensors on `x`, in eval mode."""
    import torch

    training = model.training
    try:
        with torch.no_grad():
            return [tuple(t.shape) for t in _tensors(model.eval()(x))]
    finally:
        model.train(training)


def _runs(model, x, shapes) -> bool:
    """Whether `model` runs on `x` in eval mode and gives outputs of `shapes`."""
    import torch

    training = model.training
    try:
        with torch.no_grad():
            return [tuple(t.shape) for t in _tensors(model.eval()(x))] == shapes
    except Exception:
        return False
    finally:
        model.train(training)


def _heads(model, x) -> list:
    """Names of the layers that make the model's outputs: for each output tensor, the Linear or Conv that produced it,
    or else the last one to run whose width is the output's last (Linear) or channel (Conv) dimension."""
    import torch
    import torch.nn as nn

    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append((m, o)))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    training = model.training
    try:
        with torch.no_grad():
            outs = _tensors(model.eval()(x))
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    names = {id(m): n for n, m in model.named_modules()}
    heads = []
    for o in (t for t in outs if t.dim() > 0):
        made = [m for m, y in calls if y is o] or [m for m, _ in calls if _width(m) in (o.shape[-1], o.shape[min(1, o.dim() - 1)])]
        if made and names[id(made[-1])] not in heads:
            heads.append(names[id(made[-1])])
    return heads


def _width(m) -> int:
    return getattr(m, "out_features", None) or getattr(m, "out_channels", None)


def _loose_params(model) -> tuple[dict, list]:
    """({name: dimension to prune}, [names to leave alone]) for the parameters no layer Torch-Pruning knows owns: the
    last dimension longer than one is pruned when its size is a layer width of the model."""
    import torch.nn as nn

    owners = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
              nn.modules.instancenorm._InstanceNorm, nn.Embedding, nn.MultiheadAttention, nn.PReLU, nn.LSTM)
    owned, widths = set(), set()
    for m in model.modules():
        if isinstance(m, owners):
            owned.update(id(p) for p in m.parameters())
        for attr in ("in_features", "out_features", "in_channels", "out_channels", "embedding_dim", "embed_dim", "num_features"):
            if isinstance(getattr(m, attr, None), int):
                widths.add(getattr(m, attr))
    dims, kept = {}, []
    for name, p in model.named_parameters():
        if id(p) in owned:
            continue
        long = [i for i, s in enumerate(p.shape) if s > 1]
        if long and p.shape[long[-1]] in widths:
            dims[name] = long[-1]
        else:
            kept.append(name)
    return dims, kept


def arch_record(pruned, original) -> dict:
    """How `pruned`'s architecture differs from `original`'s (an unpruned copy, same module tree), JSON-safe:
    {"modules": {path: {"params": {name: shape}, "buffers": {name: shape}, "attrs": {name: value}, "tuples": [names]}}}
    listing only what changed: the shapes of each module's own parameters and buffers (loose parameters such as a
    position embedding are the root module's, path ""), and its public plain attributes (numbers, booleans, tuples
    and lists of them: in_channels, out_features, normalized_shape, embed_dim, head_dim, ...); "tuples" names the
    attributes that were tuples, so apply_arch restores them as tuples."""
    originals = dict(original.named_modules())
    out = {}
    for path, module in pruned.named_modules():
        base = originals.get(path)
        if base is None:
            raise CompressError(f"the pruned model has a module '{path}' its original lacks")
        entry = {"params": _changed_shapes(module.named_parameters(recurse=False), base),
                 "buffers": _changed_shapes(module.named_buffers(recurse=False), base), "attrs": {}, "tuples": []}
        for name, value in vars(module).items():
            old = vars(base).get(name)
            if name.startswith("_") or name == "training" or not _plain(value) or (_plain(old) and old == value):
                continue
            entry["attrs"][name] = list(value) if isinstance(value, (tuple, list)) else value
            if isinstance(value, tuple):
                entry["tuples"].append(name)
        if any(entry.values()):
            out[path] = entry
    return {"modules": out}


def _changed_shapes(named, base) -> dict:
    return {n: list(t.shape) for n, t in named if t is not None and tuple(getattr(base, n).shape) != tuple(t.shape)}


def _plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(type(v) in _NUMBER for v in value)
    return type(value) in _NUMBER


def apply_arch(model, record) -> object:
    """Reshape `model` (a fresh unpruned copy of the original) IN PLACE to the architecture `record` (arch_record's)
    describes: changed parameters and buffers become uninitialised tensors of the recorded shapes (requires_grad
    kept), changed attributes are set, so that the pruned model's state_dict loads. The record comes from a run folder
    and is checked, never evaluated: CompressError for a module, tensor or attribute the model lacks, a shape larger
    than the model's, or a value that is not a number, a boolean or a list of them."""
    import torch
    import torch.nn as nn

    modules = dict(model.named_modules())
    entries = record.get("modules") if isinstance(record, dict) else None
    if not isinstance(entries, dict):
        raise CompressError("the pruned architecture record is not an object with 'modules'")
    for path, entry in entries.items():
        module = modules.get(path) if isinstance(path, str) else None
        if module is None or not isinstance(entry, dict) or set(entry) - {"params", "buffers", "attrs", "tuples"}:
            raise CompressError(f"the pruned architecture record names a module '{str(path)[:80]}' the model does not have, or describes it wrongly")
        for kind in ("params", "buffers"):
            for name, shape in _tensor_entries(module, path, kind, entry.get(kind, {})):
                old = getattr(module, name)
                new = torch.empty(shape, dtype=old.dtype, device=old.device)
                setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad) if kind == "params" else new)
        for name, value in _attr_entries(module, path, entry.get("attrs", {}), entry.get("tuples", [])):
            setattr(module, name, value)
    return model


def _tensor_entries(module, path, kind, shapes) -> list:
    """[(name, shape)] of one module's record entry, checked: the tensor exists, the shape is a list of as many
    non-negative ints as it has dimensions, none larger than now."""
    own = dict(module.named_parameters(recurse=False) if kind == "params" else module.named_buffers(recurse=False))
    if not isinstance(shapes, dict):
        raise CompressError(f"the pruned architecture record's {kind} of '{path}' are not an object")
    out = []
    for name, shape in shapes.items():
        t = own.get(name)
        ok = t is not None and isinstance(shape, list) and len(shape) == t.dim() and all(
            type(s) is int and 0 <= s <= n for s, n in zip(shape, t.shape))
        if not ok:
            raise CompressError(f"the pruned architecture record gives '{path}.{str(name)[:40]}' a shape the model cannot take")
        out.append((name, tuple(shape)))
    return out


def _attr_entries(module, path, attrs, tuples) -> list:
    """[(name, value)] of one module's recorded attributes, checked: the attribute exists, is public, plain data of
    the same kind as the record's value (a number or boolean, or a list of them for a tuple or list)."""
    if not isinstance(attrs, dict) or not isinstance(tuples, list) or not all(isinstance(t, str) and t in attrs for t in tuples):
        raise CompressError(f"the pruned architecture record's attributes of '{path}' are not an object of plain values")
    out = []
    for name, value in attrs.items():
        current = vars(module).get(name) if isinstance(name, str) and not name.startswith("_") and name != "training" else None
        same_kind = _plain(current) and _plain(value) and not callable(current) and (
            isinstance(current, (tuple, list)) == isinstance(value, list)) and (
            isinstance(current, bool) == isinstance(value, bool))
        if current is None or not same_kind:
            raise CompressError(f"the pruned architecture record sets '{path}.{str(name)[:40]}', "
                                "which the model lacks or holds as another kind of value")
        out.append((name, tuple(value) if name in tuples or isinstance(current, tuple) else value))
    return out


def reinitialise(model) -> object:
    """Fresh random weights for `model` IN PLACE (the same architecture trained on labels alone, a baseline): every
    module's reset_parameters() or _reset_parameters(); parameters no such module owns (a position embedding, a class
    token) drawn from a normal distribution of standard deviation 0.02, as ViTs initialise theirs."""
    import torch

    covered = set()
    for m in model.modules():
        reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
        if callable(reset):
            reset()
            covered.update(id(p) for p in m.parameters(recurse=False))
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in covered:
                p.normal_(0.0, 0.02)
    return model
