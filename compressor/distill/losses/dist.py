"""DIST (Huang et al., NeurIPS 2022): match relations instead of exact probabilities, with Pearson correlation:
inter-class (each row's class ranking) and intra-class (each class's scores across the batch)."""
from __future__ import annotations

import warnings

from .registry import mix_with_labels, register


def _pearson_distance(a, b, dim: int, eps: float = 1e-8):
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return 1 - (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def _whole_batch(t):
    """Under DDP, this rank's rows joined with every other rank's (differentiably), so the batch-level term is the
    one a single process would compute; its gradient flows back to each row's own rank."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    from torch.distributed.nn.functional import all_gather

    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    most = int(max(int(s) for s in sizes))
    padded = torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))]) if t.shape[0] < most else t
    with warnings.catch_warnings():  # its successor lives in a private module; this public one still works
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


def dist_per_row(student, teacher, T: float, beta: float, gamma: float):
    ps, pt = (student / T).softmax(1), (teacher / T).softmax(1)
    inter = _pearson_distance(ps, pt, 1)  # one value per row
    intra = _pearson_distance(_whole_batch(ps), _whole_batch(pt), 0).mean()  # one value per class over the (global) batch
    return (beta * inter + gamma * intra) * T * T


@register("dist")
def dist(student, teacher, labels, cfg):
    """alpha*DIST + (1-alpha)*CE on labeled rows; DIST alone on unlabeled rows."""
    return mix_with_labels(dist_per_row(student, teacher, cfg.temperature, cfg.dist_beta, cfg.dist_gamma), student, labels, cfg)
