"""Students that return more than the logits: a tuple (logits, features) or a dict {"logits": ..., "aux": ...}.
The tool trains, exports and benches the class scores alone, picked by --output (a dict key or a tuple index;
default the first), through a wrapper whose state dict is the student's own."""
from __future__ import annotations

from ..errors import CompressError


def describe_output(y) -> str:
    import torch

    if isinstance(y, torch.Tensor):
        return f"a tensor of shape {tuple(y.shape)}"
    if isinstance(y, dict):
        return "a dict with keys " + ", ".join(repr(k) for k in y)
    if isinstance(y, (tuple, list)):
        return f"a {type(y).__name__} of {len(y)}"
    return type(y).__name__


def pick(y, key):
    """The entry `key` of a tuple/list/dict output (None: the first); a tensor passes through."""
    import torch

    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, dict):
        if key is None:
            return next(iter(y.values()))
        if str(key) in y:
            return y[str(key)]
        raise CompressError(f"the student's output has no '{key}' (it returns {describe_output(y)})", hint="pass --output with one of its keys")
    if isinstance(y, (tuple, list)):
        try:
            return y[0 if key is None else int(key)]
        except (ValueError, IndexError):
            raise CompressError(f"--output {key} does not index the student's output ({describe_output(y)})", hint="pass --output 0, 1, …") from None
    raise CompressError(f"the student returns {describe_output(y)}, not class scores")


def select_output(module, key=None):
    """module itself when it returns a tensor for the sample; else a wrapper returning pick(output, key)."""
    import torch.nn as nn

    class SelectOutput(nn.Module):
        """Returns one entry of the wrapped student's output; saves and loads the student's own state dict."""

        def __init__(self, inner, key):
            super().__init__()
            self.inner, self.key = inner, key

        def forward(self, x):
            return pick(self.inner(x), self.key)

        def state_dict(self, *args, **kwargs):
            return self.inner.state_dict(*args, **kwargs)

        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            return self.inner.load_state_dict(state_dict, strict=strict, assign=assign)

    return SelectOutput(module, key)


def logits_only(module, record: dict, sample, key=None):
    """(module, record) for training: a student whose output on `sample` is a tuple or dict (or any student when --output
    was given) is wrapped to return pick(output, key), and the record remembers the choice so later stages rebuild the
    same wrapper. A plain tensor output with no --output passes through unchanged."""
    import numpy as np
    import torch

    if key is None:
        was_training = module.training
        try:
            with torch.no_grad():
                y = module.eval()(torch.from_numpy(np.ascontiguousarray(sample)))
        except Exception:
            return module, record  # the caller's own check says why the student cannot run
        finally:
            module.train(was_training)
        if isinstance(y, torch.Tensor):
            return module, record
    record = {**record, "output": key}
    return select_output(module, key), record


# --- teacher outputs: logits or probabilities ------------------------------------------------------------------
# A teacher ending in softmax answers probabilities; every loss reads logits. Their log is a logits vector with the same
# softmax (up to the floor), so probabilities are converted once, where the teacher's outputs are read, and nothing
# downstream needs to know. Detection: every sampled row non-negative and summing to 1. Raw logits pass that only by
# construction: with at least DETECT_MIN_ROWS rows of at least 2 classes, real-valued scores summing to 1 +- 5e-3 in every
# row by chance is out of the question (one row alone is a ~1e-3 event for scores of unit spread).
PROB_FLOOR = 1e-7  # probabilities are clipped here before the log: log(1e-7) = -16, a "never" the losses can work with
PROB_SUM_TOL = 5e-3  # float16 / bfloat16 softmax outputs sum to 1 within a few 1e-3
DETECT_MIN_ROWS = 8
DETECT_MAX_ROWS = 128  # rows of the data the teacher is run on to decide (when its outputs are not at hand already)
OUTPUT_SETTINGS = ("auto", "logits", "probs")  # the --teacher-output values that apply to every teacher's (N, C) scores


def are_probabilities(scores) -> bool:
    """True when every row of (N, C) scores is a probability distribution: values >= 0 (within the tolerance) summing to 1."""
    import numpy as np

    a = np.asarray(scores, np.float64)
    if a.ndim != 2 or a.shape[1] < 2 or not np.isfinite(a).all():
        return False
    return bool((a >= -PROB_SUM_TOL).all() and (np.abs(a.sum(1) - 1.0) <= PROB_SUM_TOL).all())


def log_probs(p):
    """The log of (N, C) probabilities (numpy array or torch tensor), clipped at PROB_FLOOR and renormalised."""
    if hasattr(p, "clamp"):  # a torch tensor (the online teacher's batches)
        p = p.clamp(PROB_FLOOR, 1.0)
        return (p / p.sum(1, keepdim=True)).log()
    import numpy as np

    p = np.clip(np.asarray(p, np.float32), PROB_FLOOR, 1.0)
    return np.log(p / p.sum(1, keepdims=True)).astype(np.float32)


def check_probabilities(scores, who: str) -> None:
    """A CompressError when scores that were said to be probabilities (--teacher-output probs) are not."""
    import numpy as np

    a = np.asarray(scores, np.float32)
    sums = a.sum(1) if a.ndim == 2 and a.size else np.ones(1)
    if not np.isfinite(a).all() or (a < -1e-6).any() or (a > 1 + 1e-6).any() or (np.abs(sums - 1) > 0.05).any():
        raise CompressError(f"{who}'s answers are not probabilities (values outside [0, 1] or rows not summing to 1: "
                            f"min {np.nanmin(a):.3g}, max {np.nanmax(a):.3g}, row sums {np.nanmin(sums):.3g}..{np.nanmax(sums):.3g})",
                            hint="use --teacher-output logits for raw scores")


def output_kind(scores, setting: str, who: str = "the teacher") -> dict:
    """How (N, C) teacher scores are read under --teacher-output `setting` (auto | logits | probs): {"kind": "logits" |
    "probs", "setting": ..., "rows": rows looked at, "detected": True when auto found probabilities}. The one place both
    the white-box flow (api) and the black-box flow (distill/blackbox.py) decide it."""
    import numpy as np

    a = np.asarray(scores)
    rec = {"setting": setting, "rows": int(len(a)), "detected": False}
    if setting == "probs":
        check_probabilities(a, who)
        return {**rec, "kind": "probs"}
    if setting == "auto" and len(a) >= DETECT_MIN_ROWS and are_probabilities(a):
        return {**rec, "kind": "probs", "detected": True}
    return {**rec, "kind": "logits"}


def output_note(rec: dict) -> str | None:
    """The report's note on how the teacher's outputs were read (None when nothing needs saying)."""
    if rec.get("detected"):
        return (f"The teacher's outputs are probabilities (each of {rec['rows']} sampled rows is non-negative and sums to 1): "
                "the student learned from their logarithm, not from them as logits. Pass --teacher-output logits to read them as they are.")
    if rec.get("kind") == "probs":
        return "The teacher's outputs were read as probabilities (--teacher-output probs): the student learned from their logarithm."
    return None


def sample_rows(n: int, k: int = DETECT_MAX_ROWS):
    """Up to k row indices spread evenly over 0..n-1 (deterministic: the same rows on every run and every rank)."""
    import numpy as np

    return np.unique(np.linspace(0, max(n - 1, 0), min(n, k)).round().astype(np.int64)) if n else np.zeros(0, np.int64)


def resolve_teacher_output(teacher, x, setting: str) -> dict:
    """Decide once per loaded teacher whether its (N, C) outputs are logits or probabilities, from its outputs on a
    sample of the rows x; sets teacher.output, so that teacher.logits() (and the online teacher) give logits either way.
    Settings other than auto/logits/probs (topk:K, label: the black-box flow's own) leave the outputs as they are."""
    rec = getattr(teacher, "output_record", None)
    if rec is not None and rec["setting"] == setting:
        return rec
    teacher.output = "logits"  # raw outputs while deciding
    if setting not in ("auto", "probs"):
        rec = {"setting": setting, "rows": 0, "detected": False, "kind": "logits"}
    else:
        who = f"the teacher ({getattr(teacher, 'spec', '') or teacher.path.name})"
        rec = output_kind(teacher.logits(x[sample_rows(len(x))]), setting, who)
    teacher.output, teacher.output_record = rec["kind"], rec
    return rec
