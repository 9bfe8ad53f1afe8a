"""Decoupled KD (Zhao et al., CVPR 2022): the KD term split into a target-class part (TCKD: how sure the
teacher is of the true class) and a non-target part (NCKD: how it spreads the rest, the 'dark knowledge'),
weighted separately. The target class is the label where there is one, else the teacher's top class."""
from __future__ import annotations

from .registry import mix_with_labels, register, standardize


def dkd_per_row(student, teacher, target, T: float, a: float, b: float, logit_standardize: bool = False):
    import torch
    import torch.nn.functional as F

    if logit_standardize:
        student, teacher = standardize(student), standardize(teacher)
    gt = F.one_hot(target, student.shape[1]).bool()
    ps, pt = F.softmax(student / T, 1), F.softmax(teacher / T, 1)
    # binary (target vs the rest) distributions
    bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1).clamp_min(1e-8)
    bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1).clamp_min(1e-8)
    tckd = (bt * (bt.log() - bs.log())).sum(1)
    # distributions over the non-target classes only: mask the target logit out
    big = 1000.0
    ls = F.log_softmax(student / T - big * gt, 1)
    lt = F.log_softmax(teacher / T - big * gt, 1)
    nckd = F.kl_div(ls, lt, reduction="none", log_target=True).sum(1)
    return (a * tckd + b * nckd) * T * T


@register("dkd")
def dkd(student, teacher, labels, cfg):
    """alpha*DKD + (1-alpha)*CE on labeled rows; DKD alone (teacher's argmax as target) on unlabeled rows."""
    target = labels.where(labels >= 0, teacher.argmax(1))
    soft = dkd_per_row(student, teacher, target, cfg.temperature, cfg.dkd_alpha, cfg.dkd_beta, cfg.logit_standardize)
    return mix_with_labels(soft, student, labels, cfg)
