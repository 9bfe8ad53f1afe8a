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
