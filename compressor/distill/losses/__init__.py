"""Distillation losses, one small module per family, looked up by name.

A loss is called as ``loss(student_logits, teacher_logits, labels, cfg)`` where labels use -1 for unlabeled rows
and teacher_logits may be None (labels-only) or a target in the form the teacher answers (see blackbox.py).
It returns a scalar. Register one with ``@register("name")`` (from .registry, re-exported here).
"""
from __future__ import annotations

from .registry import get_loss, list_losses, mix_with_labels, register, standardize  # noqa: F401  (re-exported)

# the built-in losses register themselves on import (none imports torch before it is called)
from . import dist, dkd, kd, labels  # noqa: F401

try:
    from . import blackbox  # noqa: F401
except ImportError:
    pass
