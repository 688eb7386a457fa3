"""Implicit hypergradients say when they cannot be trusted, in float64 against closed forms.

Ridge on the diabetes data (``problems.Ridge``, inner lr 0.1): the eigenvalues of the inner
Hessian A lie in [0.14, 4.17], so the Neumann series on ``I − 0.1·A`` contracts slowly
(ρ = 0.986) and ten terms are far from the inverse. A saddle problem (quadratic inner loss
with an indefinite Hessian) checks MINRES and CG's refusal.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from bilevel import hypergrad
from bilevel.errors import HypergradError, HypergradWarning, NeumannDivergenceError

from .problems import Ridge


@pytest.fixture(scope="module")
def ridge():
    return Ridge(lr=0.1)


def _implicit(ridge, state=None, **kw):
    state = state if state is not None else {"w": ridge.solution(-2.0)}
    r = hypergrad.implicit(ridge.step, ridge.outer_loss, state, ridge.hparams(), **kw)
    return r, float(r.hypergrad["log_reg"]) / ridge.implicit_exact(-2.0) - 1.0


def _silent(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradWarning)
        return fn()


def test_unconverged_neumann_series_warns_and_is_really_off(ridge):
    with pytest.warns(HypergradWarning, match=r"last Neumann term is 0\.44 of the first.*about \d+ terms"):
        r, err = _implicit(ridge)  # the defaults: K = 10, alpha = 1
    assert abs(err) > 0.3  # the warning is not a false alarm
    assert r.info["term_norms"][-1] / r.info["term_norms"][0] == pytest.approx(0.441, abs=1e-3)


def test_converged_neumann_series_is_silent_and_right(ridge):
    _, err = _silent(lambda: _implicit(ridge, terms=301))
    assert abs(err) < 0.01
    # the rule of docs/hypergrad.md: alpha ≈ 1/(lr·λ_max) needs about κ·ln(1/tol) terms
    lam = torch.linalg.eigvalsh(ridge.a_b(-2.0)[0])
    alpha = 1.0 / (ridge.lr * float(lam.max()))
    k = math.ceil(float(lam.max() / lam.min()) * math.log(1 / 1e-3))
    _, err = _silent(lambda: _implicit(ridge, terms=k + 1, alpha=alpha))
    assert abs(err) < 1e-3


def test_growing_series_raises_before_the_thousandfold_limit(ridge):
    # alpha = 6: 1 − 6·0.1·4.17 = −1.5, so the top mode grows 1.5x a term: 58x after 10,
    # below the 1000x limit that used to be the only check (the result was silently wrong).
    with pytest.raises(NeumannDivergenceError, match="larger than the term before it"):
        _implicit(ridge, alpha=6.0)
    r, _ = _implicit(ridge, alpha=6.0, on_divergence="identity")
    assert r.info["fallback"] == "identity"


def test_state_that_is_not_a_fixed_point_warns(ridge):
    h = {"log_reg": torch.tensor(-2.0, dtype=torch.float64)}
    s = ridge.state0()
    for t in range(30):
        s = ridge.step(s, h, t)
    with pytest.warns(HypergradWarning, match="not a fixed point"):
        r, err = _implicit(ridge, s, solver="exact")
    assert r.info["fixed_point_residual"] > 1e-3 and abs(err) > 0.3
    r, err = _silent(lambda: _implicit(ridge, solver="exact"))
    assert r.info["fixed_point_residual"] < 1e-12 and abs(err) < 1e-12


@pytest.mark.parametrize("solver", ["cg", "minres"])
def test_krylov_residual_warns_until_converged(ridge, solver):
    with pytest.warns(HypergradWarning, match=r"residual after 3 iterations"):
        _implicit(ridge, solver=solver, iters=3)
    r, err = _silent(lambda: _implicit(ridge, solver=solver, iters=20))
    assert abs(err) < 1e-9 and r.info["residual"] < 1e-9


class Saddle:
    """L_T = ½wᵀQw − λ bᵀw with Q indefinite: w* = λQ⁻¹b is a saddle point,
    L_V = ½‖w − u‖², so dL_V/dλ = (w* − u)ᵀ Q⁻¹ b."""

    def __init__(self, d: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        eig = torch.tensor([-2.0, -1.0, -0.5, 0.5, 0.8, 1.0, 2.0, 3.0], dtype=torch.float64)
        self.q = u @ torch.diag(eig) @ u.T
        self.b = torch.randn(d, generator=g, dtype=torch.float64)
        self.u = torch.randn(d, generator=g, dtype=torch.float64)
        self.lam = 0.7

    def step(self, s, h, t):
        return {"w": s["w"] - 0.1 * (self.q @ s["w"] - h["lam"] * self.b)}

    def outer(self, s, h):
        return 0.5 * ((s["w"] - self.u) ** 2).sum()

    def call(self, **kw):
        w = {"w": self.lam * torch.linalg.solve(self.q, self.b)}
        h = {"lam": torch.tensor(self.lam, dtype=torch.float64, requires_grad=True)}
        return hypergrad.implicit(self.step, self.outer, w, h, **kw)

    def exact(self) -> float:
        w = self.lam * torch.linalg.solve(self.q, self.b)
        return float((w - self.u) @ torch.linalg.solve(self.q, self.b))


def test_minres_solves_a_saddle_point_where_cg_refuses():
    p = Saddle()
    r = _silent(lambda: p.call(solver="minres", iters=20))
    assert float(r.hypergrad["lam"]) == pytest.approx(p.exact(), rel=1e-9)
    with pytest.raises(HypergradError, match=r"not positive definite.*minres.*on_indefinite"):
        p.call(solver="cg", iters=20)
    with pytest.raises(NeumannDivergenceError):
        p.call(solver="neumann", terms=21)
    # the explicit opt-in carries on as other libraries do, and says so
    r = p.call(solver="cg", iters=20, on_indefinite="continue")
    assert r.info["indefinite"] is True and torch.isfinite(r.hypergrad["lam"])
    with pytest.raises(ValueError, match="on_indefinite"):
        p.call(solver="cg", on_indefinite="ignore")
