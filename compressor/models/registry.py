"""The registry of built-in students (timm style): ``@register_student("name")`` on a factory
``fn(input_shape, num_classes, width=..., **kw) -> nn.Module``; ``--student builtin:name`` builds it.

The built-in families (cnn1d, cnn2d, mlp, transformer) register themselves in compressor/models/student.py, which
the package __init__ imports: importing this module runs that __init__ first, so they are always listed here.
This module imports nothing from the package (no cycle) and no third-party library.
"""
from __future__ import annotations

from ..errors import CompressError, did_you_mean

_STUDENTS: dict = {}


def register_student(name: str):
    """Decorator: register a student factory under `name` (``builtin:name``); a later registration replaces it."""
    def deco(fn):
        _STUDENTS[name] = fn
        return fn

    return deco


def get_student(name: str):
    """The factory registered as `name`; CompressError (with the closest name) for an unknown one."""
    if name not in _STUDENTS:
        raise CompressError(f"unknown built-in student '{name}'.{did_you_mean(name, _STUDENTS)}")
    return _STUDENTS[name]


def list_students() -> list[str]:
    """The registered students' names, sorted."""
    return sorted(_STUDENTS)
