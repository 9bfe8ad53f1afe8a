"""Size budgets for `--student auto` and the counter behind them.

A budget is any of ``params=…``, ``macs=…`` and ``latency_ms=…``, comma-separated or repeated: a bare number up to 1
(or a percentage) is a fraction of the teacher's count, a number above 1 or with a suffix (k, M, G) an absolute count;
``latency_ms`` is milliseconds per row on the target.

Parameters and multiply-accumulates are counted by ``torch.utils.flop_counter.FlopCounterMode``: it ships with
PyTorch (no extra dependency, kept up with new operators by PyTorch itself), counts at the dispatcher so it sees the
same kernels an eager model, a TorchScript module or a torch.export program runs, and reports by module. fvcore and thop
hook module types instead (they miss functional calls and F.scaled_dot_product_attention) and are no longer
maintained. One gap is filled here: PyTorch's fused CPU attention kernel (what nn.MultiheadAttention runs) has no
formula of its own, so it is counted with PyTorch's own formula for scaled dot-product attention.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from ..errors import CompressError

KEYS = ("params", "macs", "latency_ms")
_SUFFIX = {"": 1, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9, "b": 1e9, "B": 1e9}
_TERM = re.compile(r"^\s*(params|macs|latency_ms)\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGbB%]?)\s*$")
BUDGET_HELP = "e.g. params=0.1 (a tenth of the teacher), macs=0.25, params=2M, macs=300M, latency_ms=2"


@dataclass(frozen=True)
class Budget:
    """What the user asked for: each of params/macs is (value, is_fraction) or None; latency_ms a float or None."""

    params: tuple | None = None
    macs: tuple | None = None
    latency_ms: float | None = None
    default: bool = False  # not given on the command line (--student auto's default, params=0.1)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "default"}

    def text(self) -> str:
        parts = []
        for key in ("params", "macs"):
            v = getattr(self, key)
            if v is not None:
                parts.append(f"{key}={v[0]:.6g}" if v[1] else f"{key}={human(v[0])}")
        if self.latency_ms is not None:
            parts.append(f"latency_ms={self.latency_ms:g}")
        return ",".join(parts)

    def limits(self, teacher_params: int | None, teacher_macs: int | None) -> dict:
        """Absolute limits {params, macs, latency_ms} (only those asked for); fractions need the teacher's counts."""
        out = {}
        for key, base in (("params", teacher_params), ("macs", teacher_macs)):
            v = getattr(self, key)
            if v is None:
                continue
            value, frac = v
            if frac:
                if not base:
                    raise CompressError(f"{'the default budget' if self.default else '--budget'} {key}={value:.6g} is a fraction of the teacher's "
                                        f"{key}, which cannot be counted for this teacher",
                                        hint=f"give an absolute budget instead, e.g. {key}={'2M' if key == 'params' else '300M'}")
                value = value * base
            if value < 1:
                raise CompressError(f"--budget {key}={v[0]:.6g} of the teacher's {base:,} {key} is less than one",
                                    hint="give a larger budget")
            out[key] = int(value)
        if self.latency_ms is not None:
            out["latency_ms"] = float(self.latency_ms)
        return out


def parse_budget(values) -> Budget:
    """Budget from '--budget' values (a string or several; each comma-separated). CompressError on anything else."""
    if isinstance(values, str):
        values = [values]
    found: dict = {}
    for value in values or ():
        for term in str(value).split(","):
            if not term.strip():
                continue
            m = _TERM.match(term)
            if not m:
                raise CompressError(f"--budget '{_shown(term)}' is not KEY=VALUE with KEY one of {', '.join(KEYS)}", hint=BUDGET_HELP)
            key, num, suffix = m.group(1), float(m.group(2)), m.group(3)
            if key in found:
                raise CompressError(f"--budget gives {key} twice", hint=BUDGET_HELP)
            if not math.isfinite(num * _SUFFIX.get(suffix, 1)) or num > 1e18:
                raise CompressError(f"--budget {key}: {_shown(term)} is too large", hint=BUDGET_HELP)
            if num <= 0:
                raise CompressError(f"--budget {key} must be above 0, got {_shown(term)}", hint=BUDGET_HELP)
            if key == "latency_ms":
                if suffix:
                    raise CompressError(f"--budget latency_ms takes milliseconds as a plain number, got {_shown(term)}", hint=BUDGET_HELP)
                found[key] = num
            elif suffix == "%":
                if num > 100:
                    raise CompressError(f"--budget {key}={num:g}% is more than the teacher itself", hint=BUDGET_HELP)
                found[key] = (num / 100, True)
            elif suffix or num > 1:
                found[key] = (num * _SUFFIX[suffix], False)
                if found[key][0] < 1:
                    raise CompressError(f"--budget {key}={_shown(term)} is less than one", hint=BUDGET_HELP)
            else:
                found[key] = (num, True)
    if not found:
        raise CompressError("--student auto needs a --budget", hint=BUDGET_HELP)
    return Budget(**found)


def _shown(term: str) -> str:
    """A budget term as an error line shows it: on one line, at most 80 characters."""
    return " ".join(term.split())[:80]


def human(n: float) -> str:
    """3.2M, 410k, 1.05G."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}"


def _sdpa_cpu_formula():
    from torch.utils.flop_counter import sdpa_flop_count

    def formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)
    return formula


def count(module, example) -> tuple[int, int]:
    """(parameters, multiply-accumulates for one row) of an nn.Module (eager, TorchScript or an exported program's
    module) on one row of `example` (a tensor or array with a batch dimension)."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = example[:1]
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    params = int(sum(p.numel() for p in module.parameters()))
    custom = {}
    sdpa_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if sdpa_cpu is not None:
        custom[sdpa_cpu] = _sdpa_cpu_formula()
    was_training = getattr(module, "training", False)
    _set_mode(module, False)
    try:
        # with grad on, nn.TransformerEncoderLayer takes its step-by-step path (its fused inference path is not counted)
        with FlopCounterMode(display=False, custom_mapping=custom) as fc, torch.enable_grad():
            module(x)
    except Exception as exc:
        raise CompressError(f"cannot count the MACs of {type(module).__name__}: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}") from None
    finally:
        if was_training:
            _set_mode(module, True)
    return params, int(fc.get_total_flops() // 2)


def _set_mode(module, training: bool) -> None:
    """train()/eval() where the module allows it (a torch.export program's module refuses both)."""
    try:
        module.train(training)
    except (NotImplementedError, AttributeError, TypeError):
        pass


def teacher_macs(teacher, x) -> int | None:
    """The teacher's MACs for one row: counted on its module (eager, TorchScript, torch.export), or from its ONNX
    graph's shapes; None for a black box."""
    if teacher.format == "onnx":
        from ..bench.roofline import layers

        try:
            return int(sum(layer.macs for layer in layers(teacher.path)))
        except Exception:
            return None
    module = getattr(teacher, "module", None)
    if module is None or not callable(module):
        return None
    teacher.to("cpu")
    return count(module, x)[1]
