"""Distillation losses, looked up by name. Each takes (student_logits, teacher_logits, labels, cfg),
where labels use -1 for unlabeled rows, and returns a scalar."""
from __future__ import annotations

from ..errors import CompressError, did_you_mean


def kd(student, teacher, labels, cfg):
    """Hinton et al.: alpha*T^2*KL(teacher_T || student_T) + (1-alpha)*CE on labeled rows; the KD term alone on unlabeled rows."""
    import torch.nn.functional as F

    T = cfg.temperature
    soft = F.kl_div(F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1), reduction="none", log_target=True).sum(1) * T * T
    labeled = labels >= 0
    ce = F.cross_entropy(student, labels.clamp(min=0), reduction="none")
    per_row = soft.where(~labeled, cfg.alpha * soft + (1 - cfg.alpha) * ce)
    return per_row.mean()


def labels_only(student, teacher, labels, cfg):
    """Cross-entropy on labeled rows: the baseline that distillation must beat."""
    import torch.nn.functional as F

    return F.cross_entropy(student, labels)


_LOSSES = {"kd": kd, "labels": labels_only}


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def get_loss(name: str):
    if name not in _LOSSES:
        raise CompressError(f"unknown distillation loss '{name}'.{did_you_mean(name, _LOSSES)}", hint=f"choose one of {', '.join(list_losses())}")
    return _LOSSES[name]
