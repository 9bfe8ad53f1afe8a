"""The loss registry: each family is zero when the student copies the teacher, positive otherwise, falls back
to cross-entropy where it should, and trains a student towards the teacher."""
from __future__ import annotations

import pytest
import torch

from compressor.config import DistillConfig
from compressor.distill.losses import get_loss, list_losses
from compressor.errors import CompressError

SOFT = ["kd", "dkd", "dist"]


def test_registry_lists_every_family_and_suggests_on_typos():
    assert {"kd", "dkd", "dist", "labels"} <= set(list_losses())
    with pytest.raises(CompressError, match="Did you mean 'kd'"):
        get_loss("kdd")


@pytest.mark.parametrize("name,standardize", [(n, s) for n in SOFT for s in (False, True) if not (n == "dist" and s)])  # dist has no standardisation
def test_zero_at_the_teacher_positive_elsewhere(name, standardize):
    cfg = DistillConfig(temperature=2.0, alpha=0.5, logit_standardize=standardize)
    torch.manual_seed(0)
    t = torch.randn(16, 5) * 3
    unlabeled = torch.full((16,), -1)
    loss = get_loss(name)
    assert float(loss(t.clone(), t, unlabeled, cfg)) == pytest.approx(0.0, abs=1e-4)
    assert float(loss(torch.zeros_like(t), t, unlabeled, cfg)) > 1e-3


@pytest.mark.parametrize("name", SOFT)
def test_alpha_zero_is_cross_entropy_on_labeled_rows(name):
    t = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.1, 3.0]])
    worse = torch.zeros_like(t)
    labels = torch.tensor([0, 2])
    ce = torch.nn.functional.cross_entropy(worse, labels)
    assert float(get_loss(name)(worse, t, labels, DistillConfig(alpha=0.0))) == pytest.approx(float(ce))


def test_labels_ignores_unlabeled_rows():
    s = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert float(get_loss("labels")(s, None, torch.tensor([0, -1]), DistillConfig())) == pytest.approx(
        float(torch.nn.functional.cross_entropy(s[:1], torch.tensor([0]))))
    assert float(get_loss("labels")(s, None, torch.tensor([-1, -1]), DistillConfig())) == 0.0


def test_dkd_weights_its_two_parts():
    torch.manual_seed(1)
    s, t = torch.randn(32, 6), torch.randn(32, 6) * 2
    y = torch.full((32,), -1)
    loss = get_loss("dkd")
    only_t = float(loss(s, t, y, DistillConfig(dkd_alpha=1.0, dkd_beta=0.0)))
    only_n = float(loss(s, t, y, DistillConfig(dkd_alpha=0.0, dkd_beta=1.0)))
    both = float(loss(s, t, y, DistillConfig(dkd_alpha=1.0, dkd_beta=1.0)))
    assert only_t > 0 and only_n > 0 and both == pytest.approx(only_t + only_n, rel=1e-4)


def test_dist_ignores_a_shift_and_scale_of_the_teacher():
    # DIST matches relations (Pearson correlation), not values: a positive affine change of the
    # probabilities' logits at T=1 still changes probabilities, but adding a constant does not.
    torch.manual_seed(2)
    s, t = torch.randn(32, 6), torch.randn(32, 6)
    y = torch.full((32,), -1)
    cfg = DistillConfig(temperature=1.0)
    assert float(get_loss("dist")(s, t + 5.0, y, cfg)) == pytest.approx(float(get_loss("dist")(s, t, y, cfg)), rel=1e-5)


@pytest.mark.parametrize("name", SOFT)
def test_minimising_moves_the_student_to_the_teacher(name):
    torch.manual_seed(3)
    t = torch.randn(64, 4) * 2
    s = torch.zeros(64, 4, requires_grad=True)
    opt = torch.optim.Adam([s], lr=0.1)
    cfg = DistillConfig(temperature=1.0)
    y = torch.full((64,), -1)
    for _ in range(300):
        opt.zero_grad()
        get_loss(name)(s, t, y, cfg).backward()
        opt.step()
    agree = float((s.argmax(1) == t.argmax(1)).float().mean())
    assert agree > 0.95
