"""Hypergradients of the Commentaries recipes' own step maps, in float64 on tiny problems.

Alg. 1: the teacher's unrolled hypergradient (through differentiable Adam and the student's
train-mode BatchNorm) equals central finite differences along random directions.
Alg. 2: the recipe's implicit hyper-step equals Lorraine et al.'s formula written out by
hand, and with K Neumann terms it equals back-propagation through K + 1 gradient steps taken
from the fixed point, so more terms approach the exact unrolled hypergradient.
"""

from __future__ import annotations

import pytest
import torch

from bilevel import hypergrad
from bilevel.data import load_dataset
from bilevel.functional import module_state
from bilevel.models import CBRStudent, CBRTeacher
from bilevel.optim import adam
from bilevel.recipes import commentaries_weighting as cw


def _digits_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_dataset("digits", split_seed=0)
    x = torch.nn.functional.interpolate(ds.train.x[:n].view(-1, 1, 8, 8).double(), size=(28, 28),
                                        mode="bilinear")
    return (x - 0.5) / 0.5, ds.train.y[:n]


@pytest.mark.parametrize("arch", ["curr", "nocurr"])
def test_alg1_teacher_hypergradient_matches_finite_differences(f64: None, arch: str) -> None:
    torch.manual_seed(0)
    x, y = _digits_images(20)
    student, teacher = CBRStudent(1, 10), CBRTeacher(1, iteration_channel=arch == "curr")
    theta, s_buf = module_state(student)
    phi0, t_buf = module_state(teacher)
    batches = [(x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]) for i in range(3)]
    step = cw.make_inner_step(student, teacher, t_buf, batches, steps=3, lr=0.05)
    state0 = {"params": theta, "buffers": s_buf, "opt": adam.init(theta)}

    def meta(state: dict, hp: dict) -> torch.Tensor:
        return cw.sum_nll_by_batch(student, state["params"], state["buffers"], x[12:], y[12:], 4)

    phi = {k: v.clone().requires_grad_() for k, v in phi0.items()}
    r = hypergrad.unrolled(step, meta, state0, phi, steps=3)
    assert r.hypergrad["fc.weight"].abs().sum() > 0
    gen, eps = torch.Generator().manual_seed(1), 1e-8  # kinks (ReLU, max-pool, Adam) need a small step
    for _ in range(3):
        d = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in phi0.items()}
        analytic = sum((r.hypergrad[k] * d[k]).sum() for k in d)

        def at(s: float, d: dict = d) -> float:
            hp = {k: phi0[k] + s * eps * d[k] for k in d}
            return hypergrad.unrolled(step, meta, state0, {k: v.requires_grad_() for k, v in hp.items()},
                                      steps=3).outer_loss.item()

        numeric = (at(1.0) - at(-1.0)) / (2 * eps)
        assert analytic.item() == pytest.approx(numeric, rel=1e-6, abs=1e-8)


def test_alg1_checkpointed_and_truncated_unrolls(f64: None) -> None:
    torch.manual_seed(0)
    x, y = _digits_images(24)
    student, teacher = CBRStudent(1, 10), CBRTeacher(1)
    theta, s_buf = module_state(student)
    phi0, t_buf = module_state(teacher)
    batches = [(x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]) for i in range(4)]
    step = cw.make_inner_step(student, teacher, t_buf, batches, steps=4, lr=0.05)
    state0 = {"params": theta, "buffers": s_buf, "opt": adam.init(theta)}

    def meta(state: dict, hp: dict) -> torch.Tensor:
        return cw.sum_nll_by_batch(student, state["params"], state["buffers"], x[16:], y[16:], 4)

    phi = {k: v.clone().requires_grad_() for k, v in phi0.items()}
    full = hypergrad.unrolled(step, meta, state0, phi, steps=4).hypergrad
    ckpt = hypergrad.unrolled(step, meta, state0, phi, steps=4, checkpoint=True, segment=2).hypergrad
    trunc = hypergrad.unrolled(step, meta, state0, phi, steps=4, truncate=1).hypergrad
    for k in full:
        torch.testing.assert_close(ckpt[k], full[k], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(trunc["fc.weight"], full["fc.weight"])  # a different estimator
