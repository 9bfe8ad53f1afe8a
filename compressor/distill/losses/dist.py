"""DIST (Huang et al., NeurIPS 2022): match relations instead of exact probabilities, with Pearson correlation:
inter-class (each row's class ranking) and intra-class (each class's scores across the batch)."""
from __future__ import annotations

from . import mix_with_labels, register


def _pearson_distance(a, b, dim: int, eps: float = 1e-8):
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return 1 - (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def dist_per_row(student, teacher, T: float, beta: float, gamma: float):
    ps, pt = (student / T).softmax(1), (teacher / T).softmax(1)
    inter = _pearson_distance(ps, pt, 1)  # one value per row
    intra = _pearson_distance(ps, pt, 0).mean()  # one value per class, shared by the batch
    return (beta * inter + gamma * intra) * T * T


@register("dist")
def dist(student, teacher, labels, cfg):
    """alpha*DIST + (1-alpha)*CE on labeled rows; DIST alone on unlabeled rows."""
    return mix_with_labels(dist_per_row(student, teacher, cfg.temperature, cfg.dist_beta, cfg.dist_gamma), student, labels, cfg)
