"""Hypergradients of the Commentaries recipes' own step maps, in float64 on tiny problems.

Alg. 1: the teacher's unrolled hypergradient (through differentiable Adam and the student's
train-mode BatchNorm) equals central finite differences along random directions.
Alg. 2: the recipe's implicit hyper-step equals Lorraine et al.'s formula written out by
hand, and with K Neumann terms it equals back-propagation through K + 1 gradient steps taken
from the fixed point, so more terms approach the exact unrolled hypergradient.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from bilevel import hypergrad
from bilevel.data import load_dataset
from bilevel.functional import module_state
from bilevel.meta import blending
from bilevel.models import CBRStudent, CBRTeacher
from bilevel.optim import adam
from bilevel.recipes.commentaries import blending as cb
from bilevel.recipes.commentaries import weighting as cw
from bilevel.run import Implicit


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
    phi0, _ = module_state(teacher)
    batches = [(x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]) for i in range(3)]
    step, meta = cw.make_problem(student, teacher, batches, steps=3, lr=0.05,
                                 meta=(x[12:], y[12:], 4))[:2]
    state0 = {"params": theta, "buffers": s_buf, "opt": adam.init(theta)}

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
    phi0, _ = module_state(teacher)
    batches = [(x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]) for i in range(4)]
    step, meta = cw.make_problem(student, teacher, batches, steps=4, lr=0.05,
                                 meta=(x[16:], y[16:], 4))[:2]
    state0 = {"params": theta, "buffers": s_buf, "opt": adam.init(theta)}

    phi = {k: v.clone().requires_grad_() for k, v in phi0.items()}
    full = hypergrad.unrolled(step, meta, state0, phi, steps=4).hypergrad
    ckpt = hypergrad.unrolled(step, meta, state0, phi, steps=4, checkpoint=True, segment=2).hypergrad
    trunc = hypergrad.unrolled(step, meta, state0, phi, steps=4, truncate=1).hypergrad
    for k in full:
        torch.testing.assert_close(ckpt[k], full[k], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(trunc["fc.weight"], full["fc.weight"])  # a different estimator


@functools.cache
def _blend_problem() -> tuple:
    """Softmax regression on 4 random projections of 200 digits: a non-separable, smooth
    inner problem whose minimiser w*(M) exists; returns the recipe's Φ and L_V at w*."""
    ds = load_dataset("digits", split_seed=0)
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    x, y = ds.train.x[:200].double() @ proj, ds.train.y[:200]
    xv, yv = ds.val.x[:100].double() @ proj, ds.val.y[:100]
    net = nn.Sequential(nn.Linear(4, 10)).double()
    m = (blending.init_logits(10, dtype=torch.float64).detach()
         + torch.randn(10, 10, generator=gen, dtype=torch.float64)).requires_grad_()
    perm = cb.perm_for(0, 1, 1, 200)
    xb, lam = blending.blend(x, y, m.detach(), perm)
    opt = torch.optim.LBFGS(net.parameters(), lr=1, max_iter=500, tolerance_grad=1e-13,
                            tolerance_change=0, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = blending.blended_loss(net(xb), y, perm, lam)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    closure()
    grad_norm = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
    assert grad_norm < 1e-7, f"inner problem not converged: |grad| = {grad_norm:.2e}"
    return net, m, (x, y), (xv, yv), perm


def test_alg2_hyper_step_is_lorraines_formula_with_k1(f64: None) -> None:
    net, m, train, val, perm = _blend_problem()
    alpha = 0.3
    cfg = Implicit(solver="neumann", iters=1)
    got = cb.hyper_step(net, m, train, val, perm, cfg=cfg, alpha=alpha).hypergrad["M"]
    # By hand (Lorraine et al. / the seed's hyper_step): p = α(v + (I − αH)v); −(∂g_T/∂M)ᵀp.
    w = list(net.parameters())
    xb, lam = blending.blend(*train, m, perm)
    g = torch.autograd.grad(blending.blended_loss(net(xb), train[1], perm, lam), w, create_graph=True)
    v = torch.autograd.grad(torch.nn.functional.cross_entropy(net(val[0]), val[1]), w)
    hv = torch.autograd.grad(g, w, v, retain_graph=True)
    p = [alpha * (vi + (vi - alpha * hi)) for vi, hi in zip(v, hv, strict=True)]
    (want,) = torch.autograd.grad(g, [m], p)
    torch.testing.assert_close(got, -want, rtol=1e-10, atol=1e-14)
    assert got.abs().sum() > 0


@pytest.mark.filterwarnings("ignore::bilevel.errors.HypergradWarning")  # K = 1, 10 on purpose
def test_alg2_neumann_terms_approach_exact_unrolled(f64: None) -> None:
    net, m, train, val, perm = _blend_problem()
    alpha = 0.5  # below 2/λ_max(H): Φ contracts, so the fixed point's residual does not grow
    step, loss_v, w, hp = cb.blend_problem(net, m, train, val, perm, alpha=alpha)
    cg = hypergrad.implicit(step, loss_v, w, hp, solver="cg", iters=500).hypergrad["M"]
    errors = []
    for k in (1, 10, 100, 1000):
        cfg = Implicit(solver="neumann", iters=k)
        neumann = cb.hyper_step(net, m, train, val, perm, cfg=cfg, alpha=alpha).hypergrad["M"]
        # At a fixed point, K Neumann terms = back-propagation through K + 1 steps of Φ.
        unrolled = hypergrad.unrolled(step, loss_v, w, hp, steps=k + 1).hypergrad["M"]
        assert (neumann - unrolled).norm() < 1e-5 * unrolled.norm(), k
        errors.append(((neumann - cg).norm() / cg.norm()).item())
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.1 < 0.5 < errors[0], errors
