"""Bad input and numerical trouble give errors that say what happened and what to do."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad

from bilevel import hypergrad
from bilevel.errors import (
    HypergradError,
    NeumannDivergenceError,
    NonFiniteError,
    TreeStructureError,
)
from tests.hypergrad.problems import Ridge


@pytest.fixture(scope="module")
def ridge():
    return Ridge()


def test_step_returning_another_structure(ridge):
    def bad(s, h, t):
        return {**ridge.step(s, h, t), "extra": torch.zeros(1)}

    with pytest.raises(TreeStructureError, match="extra"):
        hypergrad.unrolled(bad, ridge.outer_loss, ridge.state0(), ridge.hparams(), steps=2)


def test_hparams_that_do_not_require_grad(ridge):
    h = {"log_reg": torch.tensor(-2.0, dtype=torch.float64)}
    for call in (
        lambda: hypergrad.unrolled(ridge.step, ridge.outer_loss, ridge.state0(), h, steps=2),
        lambda: hypergrad.implicit(ridge.step, ridge.outer_loss, ridge.state0(), h),
    ):
        with pytest.raises(HypergradError, match=r"'log_reg' does not require grad.*requires_grad=True"):
            call()


def test_step_that_mutates_its_input(ridge):
    def mutating(s, h, t):
        new = ridge.step(s, h, t)
        s["w"].add_(1.0)
        return new

    with pytest.raises(HypergradError, match=r"in place.*pure"):
        hypergrad.unrolled(mutating, ridge.outer_loss, ridge.state0(), ridge.hparams(), steps=2)


def test_op_without_double_backward_is_named_with_the_fix(ridge):
    # torch.cdist has no double backward: pull the weights towards an anchor by distance.
    anchor = torch.ones(1, ridge.d, dtype=torch.float64)

    def step(s, h, t):
        def lt(w):
            r = ridge.xt @ w - ridge.yt
            pull = torch.cdist(w[None], anchor).sum()
            return 0.5 * (r * r).mean() + torch.exp(h["log_reg"]) * pull
        return {"w": s["w"] - 0.1 * grad(lt)(s["w"])}

    with pytest.raises(HypergradError, match=r"_cdist_backward has no double-backward.*hypergrad.forward"):
        hypergrad.unrolled(step, ridge.outer_loss, ridge.state0(), ridge.hparams(), steps=3)
    with pytest.raises(HypergradError, match=r"no double-backward.*solver='identity'"):
        hypergrad.implicit(step, ridge.outer_loss, ridge.state0(), ridge.hparams(), terms=3)
    # cdist has no forward-mode derivative of its backward either: said just as plainly
    with pytest.raises(HypergradError, match=r"forward mode.*_cdist_backward.*unrolled"):
        hypergrad.forward(step, ridge.outer_loss, ridge.state0(), ridge.hparams(), steps=3)


def test_autograd_style_steps_give_the_same_hypergradient(ridge):
    def step(s, h, t):
        (g,) = torch.autograd.grad(ridge.train_loss(s["w"], h), s["w"], create_graph=True)
        return {"w": s["w"] - ridge.lr * g}

    for kw in ({}, {"truncate": 5}, {"checkpoint": True}):
        a = hypergrad.unrolled(step, ridge.outer_loss, ridge.state0(), ridge.hparams(), steps=20, **kw)
        b = hypergrad.unrolled(ridge.step, ridge.outer_loss, ridge.state0(), ridge.hparams(), steps=20, **kw)
        assert float(a.hypergrad["log_reg"]) == pytest.approx(float(b.hypergrad["log_reg"]), rel=1e-12)


def test_diverging_neumann_series_is_detected(ridge):
    big = Ridge(lr=1.0)  # I - lr*H has eigenvalues below -1: the series grows
    w_star = {"w": big.solution(-2.0)}
    with pytest.raises(NeumannDivergenceError, match="smaller alpha"):
        hypergrad.implicit(big.step, big.outer_loss, w_star, big.hparams(), terms=201)
    r = hypergrad.implicit(
        big.step, big.outer_loss, w_star, big.hparams(), terms=201, on_divergence="identity"
    )
    assert r.info["fallback"] == "identity"
    # a damped series (alpha) makes the same map contractive again
    ok = hypergrad.implicit(big.step, big.outer_loss, w_star, big.hparams(), terms=3001, alpha=0.1)
    assert float(ok.hypergrad["log_reg"]) == pytest.approx(big.implicit_exact(-2.0), rel=1e-5)


def test_non_finite_state_is_reported_with_its_step_and_nothing_written_back():
    blowup = Ridge(lr=3.0)
    s0 = blowup.state0()
    for kw in ({}, {"checkpoint": True, "segment": 4}):
        with pytest.raises(NonFiniteError) as info:
            hypergrad.unrolled(blowup.step, blowup.outer_loss, s0, blowup.hparams(), steps=400, **kw)
        assert info.value.what == "state" and 0 < info.value.step < 400
        assert "step" in str(info.value)
    assert torch.equal(s0["w"], torch.zeros_like(s0["w"]))
    with pytest.raises(NonFiniteError) as info:
        hypergrad.forward(blowup.step, blowup.outer_loss, s0, blowup.hparams(), steps=400)
    assert info.value.what == "state"


def test_a_leaf_passed_through_unchanged_is_checked_once_and_still_caught():
    """The unroll skips re-checking a state leaf the step returns unchanged (the same tensor
    object, e.g. a momentum buffer without momentum): it was checked after the first step,
    so a NaN there is still reported, at the first step; a changing leaf is checked every
    step."""
    lam = torch.tensor(0.5, requires_grad=True)

    def step(s, h, t):  # "frozen" passes through; "w" turns NaN at step 3
        w = s["w"] - h * s["w"] + (torch.nan if t == 3 else 0.0)
        return {"w": w, "frozen": s["frozen"]}

    def outer(s, h):
        return (s["w"] ** 2).sum()

    ok = {"w": torch.ones(2), "frozen": torch.zeros(2)}
    with pytest.raises(NonFiniteError) as info:
        hypergrad.unrolled(step, outer, ok, lam, steps=6)
    assert info.value.step == 3
    bad = {"w": torch.ones(2), "frozen": torch.tensor([0.0, torch.nan])}
    with pytest.raises(NonFiniteError) as info:
        hypergrad.unrolled(step, outer, bad, lam, steps=2, start=5)
    assert info.value.step == 5


def test_argument_errors(ridge):
    with pytest.raises(ValueError, match="solver must be one of"):
        hypergrad.implicit(ridge.step, ridge.outer_loss, ridge.state0(), ridge.hparams(), solver="lu")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        hypergrad.unrolled(ridge.step, ridge.outer_loss, ridge.state0(), ridge.hparams(), steps=0)
    with pytest.raises(HypergradError, match=r"exact.*max_dim"):
        hypergrad.implicit(ridge.step, ridge.outer_loss, ridge.state0(), ridge.hparams(), solver="exact", max_dim=3)
