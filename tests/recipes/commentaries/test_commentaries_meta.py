"""The Commentaries meta-parametrisations: weights, blending proportions, conventions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bilevel.meta import blending, weighting
from bilevel.recipes.commentaries.weighting import student_progress


def test_blending_proportions_init_and_inverse() -> None:
    m = blending.init_logits(10)
    assert m.requires_grad and m.shape == (10, 10)
    lam = blending.proportions(m)
    assert torch.allclose(lam, torch.full((10, 10), 1 - 0.5 * torch.sigmoid(torch.tensor(-1.0))))
    assert float(lam[0, 0].detach()) == pytest.approx(0.8655, abs=1e-4)
    want = torch.tensor([0.51, 0.7, 0.99])
    torch.testing.assert_close(blending.proportions(blending.logits_for(want)), want)
    with pytest.raises(ValueError, match=r"between 0\.5 and 1"):
        blending.logits_for(torch.tensor([0.4]))


def test_random_blending_covers_the_range_not_the_seed_bug() -> None:
    lam = blending.proportions(blending.random_logits(10, generator=torch.Generator().manual_seed(0)))
    assert 0.5 < lam.min() < 0.55 and 0.95 < lam.max() < 1.0  # the seed's draws: [0.635, 0.689]


def test_blend_and_two_target_loss_by_hand() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    y, perm = torch.tensor([0, 1, 1]), torch.tensor([1, 0, 2])
    m = torch.zeros(2, 2)
    m[0, 1] = 2.0
    xb, lam = blending.blend(x, y, m, perm)
    l01 = 1 - 0.5 * torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(lam, torch.stack([l01, torch.tensor(0.75), torch.tensor(0.75)]))
    torch.testing.assert_close(xb[0], l01 * x[0] + (1 - l01) * x[1])
    torch.testing.assert_close(xb[2], x[2])  # blended with itself
    logits = torch.randn(3, 2)
    want = sum(lam[b] * F.cross_entropy(logits[b:b + 1], y[b:b + 1])
               + (1 - lam[b]) * F.cross_entropy(logits[b:b + 1], y[perm][b:b + 1]) for b in range(3)) / 3
    torch.testing.assert_close(blending.blended_loss(logits, y, perm, lam), want)
    # gradients reach M through both the inputs and the proportions
    m.requires_grad_()
    xb, lam = blending.blend(x, y, m, perm)
    (g,) = torch.autograd.grad(blending.blended_loss(xb @ torch.tensor([[1.0, -1.0], [0.5, 2.0]]), y, perm, lam), m)
    assert g[0, 1] != 0 and g[1, 0] != 0 and g[1, 1] == 0  # a self-pair has one target


def test_weighted_nll_is_a_sum_and_weights_scale_examples() -> None:
    lp = torch.log_softmax(torch.randn(4, 3), 1)
    y = torch.tensor([0, 1, 2, 0])
    assert weighting.weighted_nll(lp, y).item() == pytest.approx(4 * F.nll_loss(lp, y).item(), rel=1e-6)
    c = torch.tensor([1.0, 0.0, 0.0, 0.5])
    want = -(lp[0, 0] + 0.5 * lp[3, 0])
    assert weighting.weighted_nll(lp, y, c).item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        weighting.weighted_nll(lp, y, torch.ones(3))
    assert weighting.progress(99, 100) == 0.99
    with pytest.raises(ValueError, match="steps"):
        weighting.progress(0, 0)


def test_student_progress_modes() -> None:
    assert student_progress(250, inner_steps=100, total_steps=781, mode="seed") == 2.5
    assert student_progress(250, inner_steps=100, total_steps=781, mode="clamp") == 0.99
    assert student_progress(50, inner_steps=100, total_steps=781, mode="clamp") == 0.5
    assert student_progress(780, inner_steps=100, total_steps=781, mode="stretch") == pytest.approx(0.99)
    with pytest.raises(ValueError, match="clamp"):
        student_progress(0, inner_steps=100, total_steps=10, mode="other")
