"""Every method against closed forms and finite differences on ridge regression (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from bilevel import hypergrad
from tests.hypergrad.problems import Ridge

T = 40


@pytest.fixture(scope="module")
def ridge() -> Ridge:
    return Ridge()


def _unrolled(ridge: Ridge, **kw) -> float:
    r = hypergrad.unrolled(ridge.step, ridge.outer_loss, ridge.state0(), ridge.hparams(), steps=T, **kw)
    return float(r.hypergrad["log_reg"])


def test_unrolled_matches_independent_recursion(ridge):
    assert _unrolled(ridge) == pytest.approx(ridge.unrolled_exact(-2.0, T), rel=1e-10)


def test_unrolled_matches_finite_differences(ridge):
    eps = 1e-6
    fd = (ridge.outer_after(-2.0 + eps, T) - ridge.outer_after(-2.0 - eps, T)) / (2 * eps)
    assert _unrolled(ridge) == pytest.approx(fd, rel=1e-6)


def test_checkpointed_equals_plain(ridge):
    plain = hypergrad.unrolled(ridge.step, ridge.outer_loss, ridge.state0(), ridge.hparams(), steps=T)
    for segment in (None, 1, 7, T):
        ck = hypergrad.unrolled(
            ridge.step, ridge.outer_loss, ridge.state0(), ridge.hparams(), steps=T,
            checkpoint=True, segment=segment,
        )
        assert abs(float(ck.hypergrad["log_reg"] - plain.hypergrad["log_reg"])) <= 1e-12
        assert torch.equal(ck.state["w"], plain.state["w"])


@pytest.mark.parametrize("k", [1, 5, T // 2])
def test_truncation_keeps_only_the_last_k_steps(ridge, k):
    got = _unrolled(ridge, truncate=k)
    assert got == pytest.approx(ridge.unrolled_exact(-2.0, T, carried=k), rel=1e-10)
    assert got != pytest.approx(ridge.unrolled_exact(-2.0, T), rel=1e-3)


def test_truncate_with_checkpoint(ridge):
    got = _unrolled(ridge, truncate=9, checkpoint=True)
    assert got == pytest.approx(ridge.unrolled_exact(-2.0, T, carried=9), rel=1e-10)


def test_forward_equals_reverse(ridge):
    fwd = hypergrad.forward(ridge.step, ridge.outer_loss, ridge.state0(), ridge.hparams(), steps=T)
    assert float(fwd.hypergrad["log_reg"]) == pytest.approx(_unrolled(ridge), rel=1e-12)
    assert float(fwd.outer_loss) == pytest.approx(ridge.outer_after(-2.0, T), rel=1e-12)


@pytest.mark.parametrize(
    ("solver", "iters", "rel"),
    [("exact", 0, 1e-9), ("cg", 50, 1e-7), ("neumann", 4000, 1e-6)],
)
def test_implicit_matches_analytic_derivative(ridge, solver, iters, rel):
    w_star = {"w": ridge.solution(-2.0)}
    r = hypergrad.implicit(
        ridge.step, ridge.outer_loss, w_star, ridge.hparams(), solver=solver,
        **({"terms": iters + 1} if solver == "neumann" else {"iters": iters}),
    )
    assert float(r.hypergrad["log_reg"]) == pytest.approx(ridge.implicit_exact(-2.0), rel=rel)


def test_implicit_identity_is_neumann_with_no_terms(ridge):
    w_star = {"w": ridge.solution(-2.0)}
    a = hypergrad.implicit(ridge.step, ridge.outer_loss, w_star, ridge.hparams(), solver="identity")
    b = hypergrad.implicit(ridge.step, ridge.outer_loss, w_star, ridge.hparams(), solver="neumann", terms=1)
    assert torch.equal(a.hypergrad["log_reg"], b.hypergrad["log_reg"])
    # Identity approximates H^-1 by (lr I)^-1 ... scaled: -lr * d2L/dwdλ^T g, computed by hand.
    w = w_star["w"]
    gv = ridge.xv.T @ (ridge.xv @ w - ridge.yv) / ridge.xv.shape[0]
    manual = -ridge.lr * math.exp(-2.0) * float(w @ gv)
    assert float(a.hypergrad["log_reg"]) == pytest.approx(manual, rel=1e-10)


def test_implicit_alpha_damped_neumann_converges_to_the_same_answer(ridge):
    w_star = {"w": ridge.solution(-2.0)}
    r = hypergrad.implicit(
        ridge.step, ridge.outer_loss, w_star, ridge.hparams(), solver="neumann", terms=6001, alpha=0.7
    )
    assert float(r.hypergrad["log_reg"]) == pytest.approx(ridge.implicit_exact(-2.0), rel=1e-6)


def test_unrolled_converges_to_implicit_for_long_training(ridge):
    r = hypergrad.unrolled(ridge.step, ridge.outer_loss, ridge.state0(), ridge.hparams(), steps=3000)
    assert float(r.hypergrad["log_reg"]) == pytest.approx(ridge.implicit_exact(-2.0), rel=1e-4)


def _autograd_step(ridge):
    def step(s, h, t):
        (g,) = torch.autograd.grad(ridge.train_loss(s["w"], h), s["w"], create_graph=True)
        return {"w": s["w"] - ridge.lr * g}
    return step


def test_forward_runs_autograd_style_steps(ridge):
    """A step written with torch.autograd.grad(create_graph=True) runs in forward mode (dual
    tensors, forward-over-reverse) and agrees with reverse mode and the closed form."""
    step = _autograd_step(ridge)
    h = {"log_reg": torch.tensor(-2.0, dtype=torch.float64, requires_grad=True),
         "extra": torch.zeros(2, dtype=torch.float64, requires_grad=True)}  # unused: zeros
    fwd = hypergrad.forward(step, ridge.outer_loss, ridge.state0(), h, steps=T)
    assert float(fwd.hypergrad["log_reg"]) == pytest.approx(ridge.unrolled_exact(-2.0, T), rel=1e-10)
    assert torch.equal(fwd.hypergrad["extra"], torch.zeros(2, dtype=torch.float64))
    assert float(fwd.outer_loss) == pytest.approx(ridge.outer_after(-2.0, T), rel=1e-12)
    assert not fwd.state["w"].requires_grad and fwd.hypergrad["log_reg"].grad_fn is None


@pytest.mark.parametrize("style", ["func", "autograd"])
def test_forward_keeps_no_graph_between_steps(ridge, style):
    """Memory flat in T: the state a step returned is freed two steps later."""
    import weakref

    inner = ridge.step if style == "func" else _autograd_step(ridge)
    refs: list = []

    def step(s, h, t):
        if t >= 2:
            assert refs[t - 2]() is None, f"the state of step {t - 2} is still alive at step {t}"
        new = inner(s, h, t)
        refs.append(weakref.ref(new["w"]))
        return new

    hypergrad.forward(step, ridge.outer_loss, ridge.state0(), ridge.hparams(), steps=6)
