"""The registry of runners (the classes behind the Runner interface), looked up by name:
``@register_runner("name")`` on a class, ``get_runner("name")`` for it, ``list_runners()`` for every name.

A runner whose module needs an optional library is registered lazily, by name and import path
(``register_runner("tensorrt", lazy="compressor.runtime.tensorrt:TensorRTRunner")``): get_runner imports that module
only when asked for it, and the module's own @register_runner then replaces the lazy entry with the class.
The built-in runners register themselves in compressor/runtime/__init__.py; importing this module runs that
__init__ first, so they are always listed. This module imports nothing from the package (no cycle) and no
third-party library.
"""
from __future__ import annotations

import importlib

from ..errors import CompressError, did_you_mean

_RUNNERS: dict = {}  # name -> runner class, or "module:attribute" for one not imported yet


def register_runner(name: str, *, lazy: str | None = None):
    """Decorator: register a runner class under `name`. With lazy="package.module:Class", register that class by its
    import path instead (nothing is imported until get_runner asks for it); then returns None."""
    if lazy is not None:
        if ":" not in lazy:
            raise ValueError(f"lazy runner {name!r} must be 'package.module:Class', got {lazy!r}")
        _RUNNERS.setdefault(name, lazy)  # never replaces a class already imported and registered
        return None

    def deco(cls):
        _RUNNERS[name] = cls
        return cls

    return deco


def get_runner(name: str):
    """The runner class registered as `name` (importing its module when registered lazily); CompressError with the
    closest name for an unknown one."""
    if name not in _RUNNERS:
        raise CompressError(f"unknown runner '{name}'.{did_you_mean(name, _RUNNERS)}", hint=f"choose one of {', '.join(list_runners())}")
    entry = _RUNNERS[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        _RUNNERS[name] = cls
        return cls
    return entry


def list_runners() -> list[str]:
    """Every registered runner's name, sorted (lazy ones included, without importing them)."""
    return sorted(_RUNNERS)
