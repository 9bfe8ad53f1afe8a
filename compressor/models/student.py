"""Students: a user factory ('file.py:build' / 'pkg.mod:build') or a built-in family sized to the data."""
from __future__ import annotations

import math

from ..errors import CompressError, did_you_mean
from ._spec import call_factory, load_callable


def _torch():
    import torch
    import torch.nn as nn

    return torch, nn


def cnn1d(input_shape: tuple, num_classes: int, width: int = 16):
    """A small 1-D conv net for signals shaped (L,) or (C, L)."""
    torch, nn = _torch()
    in_ch, length = (1, input_shape[0]) if len(input_shape) == 1 else input_shape
    out_len = math.ceil(math.ceil(length / 2) / 2)

    class CNN1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv1d(in_ch, width, 5, padding=2, stride=2), nn.ReLU(),
                nn.Conv1d(width, width, 3, padding=1, stride=2), nn.ReLU(),
                nn.Conv1d(width, width, 3, padding=1), nn.ReLU(),
            )
            self.head = nn.Linear(width * out_len, num_classes)

        def forward(self, x):
            if x.dim() == 2:
                x = x.unsqueeze(1)
            return self.head(self.features(x).flatten(1))

    return CNN1d()


def cnn2d(input_shape: tuple, num_classes: int, width: int = 16):
    """A small 2-D conv net for images shaped (C, H, W)."""
    torch, nn = _torch()
    in_ch = input_shape[0]

    def block(i, o, s):
        return [nn.Conv2d(i, o, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(
        *block(in_ch, width, 1), *block(width, 2 * width, 2), *block(2 * width, 2 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )


def mlp(input_shape: tuple, num_classes: int, width: int = 64):
    """A two-layer perceptron over the flattened input."""
    torch, nn = _torch()
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(), nn.Linear(width, num_classes))


_STUDENTS = {"cnn1d": cnn1d, "cnn2d": cnn2d, "mlp": mlp}
_WIDTHS = (4, 6, 8, 12, 16, 20, 24, 32, 48, 64, 96, 128)


def list_students() -> list[str]:
    return sorted(_STUDENTS)


def _family(input_shape: tuple) -> str:
    return {1: "cnn1d", 2: "cnn1d", 3: "cnn2d"}.get(len(input_shape), "mlp")


def _params(m) -> int:
    return int(sum(p.numel() for p in m.parameters()))


def default_student_record(input_shape: tuple, num_classes: int, teacher_params: int | None) -> dict:
    """The built-in student for this data: the widest of its family within a tenth of the teacher's parameters."""
    family = _family(input_shape)
    width = 16
    if teacher_params:
        fitting = [w for w in _WIDTHS if _params(_STUDENTS[family](input_shape, num_classes, w)) <= teacher_params / 10]
        width = fitting[-1] if fitting else _WIDTHS[0]
    return {"spec": f"builtin:{family}", "kwargs": {"input_shape": list(input_shape), "num_classes": num_classes, "width": width}}


def build_student(spec: str | None, input_shape: tuple, num_classes: int, teacher_params: int | None = None):
    """Build a fresh student; returns (module, record) where record rebuilds it in later stages."""
    if spec is None or spec == "default":
        record = default_student_record(input_shape, num_classes, teacher_params)
    elif spec.startswith("builtin:"):
        record = {"spec": spec, "kwargs": {"input_shape": list(input_shape), "num_classes": num_classes}}
    else:
        record = {"spec": spec, "kwargs": {}}
    return load_student(record, input_shape=input_shape, num_classes=num_classes), record


def load_student(record: dict, input_shape: tuple | None = None, num_classes: int | None = None):
    """Rebuild the (untrained) student module described by a record from build_student."""
    _, nn = _torch()
    spec = record["spec"]
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in _STUDENTS:
            raise CompressError(f"unknown built-in student '{name}'.{did_you_mean(name, _STUDENTS)}")
        kw = dict(record["kwargs"])
        kw["input_shape"] = tuple(kw["input_shape"])
        module = _STUDENTS[name](**kw)
    else:
        fn = load_callable(spec, "--student")
        module = call_factory(fn, spec, "--student", num_classes=num_classes, input_shape=input_shape)
    if not isinstance(module, nn.Module):
        raise CompressError(f"--student '{spec}' returned {type(module).__name__}, not a torch.nn.Module")
    return module
