"""Losses for black-box teachers (compressor/distill/blackbox.py makes their targets).

The target array is float32 (N, C) where NaN means "the teacher did not say": a row of NaN is a row the teacher
was never asked about (a labeled row outside the query budget: it trains on its label alone), and in a topk:K
answer every class outside the row's top K is NaN.

- "topk" (also registered as "bbkd"): T^2 * KL(q_T || student_T), where q is the teacher's distribution over the
  classes it gave (softmax of the known entries, zero elsewhere) and the student's distribution is over every
  class. With every class known this is Hinton's KD; with top K known the student learns to put its mass on the
  teacher's top K in the teacher's proportions; with K = 1 it is cross-entropy on the teacher's top class.
- "pseudo": cross-entropy on the teacher's class (the argmax of the target row) with label smoothing 0.1.

Both mix with the label like kd: alpha * teacher term + (1 - alpha) * CE on rows that have both, the teacher
term alone on unlabeled rows, CE alone on labeled rows the teacher was not asked about.
"""
from __future__ import annotations

from .registry import register

LABEL_SMOOTHING = 0.1


def _mix(per_row, has_teacher, student, labels, cfg):
    import torch
    import torch.nn.functional as F

    labeled = labels >= 0
    ce = F.cross_entropy(student, labels.clamp(min=0), reduction="none")
    both = cfg.alpha * per_row + (1 - cfg.alpha) * ce
    out = torch.where(has_teacher & labeled, both, torch.where(has_teacher, per_row, ce))
    weight = (has_teacher | labeled).float()
    return (out * weight).sum() / weight.sum().clamp(min=1.0)


def partial_kd_per_row(student, teacher, T: float):
    """Per-row T^2 * KL(q_T || s_T) over the classes the teacher gave (NaN entries carry no mass); 0 for unknown rows."""
    import torch
    import torch.nn.functional as F

    known = ~torch.isnan(teacher)
    has = known.any(1, keepdim=True)
    t = torch.where(known, teacher, torch.full_like(teacher, float("-inf")))
    t = torch.where(has, t, torch.zeros_like(t))  # rows with nothing known: any finite value (masked out below)
    log_q = F.log_softmax(t / T, 1)
    q = log_q.exp()
    log_q = torch.where(known, log_q, torch.zeros_like(log_q))  # q is 0 there: keep 0 * log q finite
    log_s = F.log_softmax(student / T, 1)
    per_row = (q * (log_q - log_s)).sum(1) * T * T
    return torch.where(has.squeeze(1), per_row, torch.zeros_like(per_row)), has.squeeze(1)


@register("topk")
def topk(student, teacher, labels, cfg):
    """KD towards the teacher's distribution over the classes it answered for (its top K; all of them for logits/probs)."""
    per_row, has = partial_kd_per_row(student, teacher, cfg.temperature)
    return _mix(per_row, has, student, labels, cfg)


register("bbkd")(topk)


@register("pseudo")
def pseudo(student, teacher, labels, cfg):
    """Cross-entropy with label smoothing on the class a label-only teacher answered."""
    import torch
    import torch.nn.functional as F

    known = ~torch.isnan(teacher)
    has = known.any(1)
    cls = torch.where(known, teacher, torch.full_like(teacher, float("-inf"))).argmax(1)
    per_row = F.cross_entropy(student, cls, label_smoothing=LABEL_SMOOTHING, reduction="none")
    return _mix(per_row, has, student, labels, cfg)
