"""Hinton, Vinyals and Dean (2015): KL between temperature-softened teacher and student distributions."""
from __future__ import annotations

from .registry import mix_with_labels, register, standardize


def kd_per_row(student, teacher, T: float, logit_standardize: bool = False):
    import torch.nn.functional as F

    if logit_standardize:
        student, teacher = standardize(student), standardize(teacher)
    return F.kl_div(F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1), reduction="none", log_target=True).sum(1) * T * T


@register("kd")
def kd(student, teacher, labels, cfg):
    """alpha*T^2*KL(teacher_T || student_T) + (1-alpha)*CE on labeled rows; the KD term alone on unlabeled rows."""
    return mix_with_labels(kd_per_row(student, teacher, cfg.temperature, cfg.logit_standardize), student, labels, cfg)
