"""The loss registry (``@register("name")``, ``get_loss``, ``list_losses``) and the helpers the losses share.

The loss modules import from here, never from the package __init__ (which imports them); importing this module
runs the package __init__ first, so every built-in loss is registered before get_loss or list_losses answers.
"""
from __future__ import annotations

from ...errors import CompressError, did_you_mean

_LOSSES: dict = {}


def register(name: str):
    def deco(fn):
        _LOSSES[name] = fn
        return fn

    return deco


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def get_loss(name: str):
    if name not in _LOSSES:
        raise CompressError(f"unknown distillation loss '{name}'.{did_you_mean(name, _LOSSES)}", hint=f"choose one of {', '.join(list_losses())}")
    return _LOSSES[name]


def mix_with_labels(soft_per_row, student, labels, cfg):
    """alpha*soft + (1-alpha)*CE on labeled rows; the soft term alone on unlabeled rows; mean over the batch."""
    import torch.nn.functional as F

    labeled = labels >= 0
    ce = F.cross_entropy(student, labels.clamp(min=0), reduction="none")
    return soft_per_row.where(~labeled, cfg.alpha * soft_per_row + (1 - cfg.alpha) * ce).mean()


def standardize(z, eps: float = 1e-7):
    """Z-score each row of logits (Sun et al., CVPR 2024: 'Logit Standardization in Knowledge Distillation')."""
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + eps)
