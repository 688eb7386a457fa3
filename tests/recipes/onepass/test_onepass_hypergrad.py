"""onepass's hyper-steps against closed forms on a quadratic (linear least squares, float64).

For ``L(w) = mean((Xw − y)²)`` the Hessian is ``H = 2XᵀX/n`` and one update of Clarke et al.'s
SGD is ``w1 = w0 − η(μ b0 + ∇L_T(w0) + wd·w0)``, so with ``p = Σ_{j<i} (I − η(H + wd I))^j ∇L_V(w1)``
the one-pass hypergradient is ``g_λ = −(∂u/∂λ)ᵀ p`` (seeds.md §3.1). With ``i = 1`` it is the
exact unrolled hypergradient of the last update.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bilevel import hypergrad
from bilevel.data import Split
from bilevel.hypergrad import HyperSGD
from bilevel.optim.hyperparameters import HParamSpec, Hyperparameters
from bilevel.recipes.onepass.algos import (
    baydin,
    baydin_through_update,
    diff_through_opt,
    lorraine,
    ours,
)
from bilevel.recipes.onepass.inner import Inner
from bilevel.recipes.onepass.task import Task

LN10 = math.log(10.0)


def _problem(lr: float = 0.05, wd: float = 1e-2, mu: float = 0.6, *, learn=("lr", "weight_decay", "momentum")):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, generator=g, dtype=torch.float64), torch.randn(24, 1, generator=g, dtype=torch.float64)
    xv, yv = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randn(10, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    task = Task("regression", model, {"train": Split(x, y), "val": Split(xv, yv), "test": Split(xv, yv)},
                {}, batch_size=24, bptt=1, eval_batch_size=100)
    from bilevel.data import IndexSampler
    task.samplers = {"train": IndexSampler(24, 24, seed=0), "val": IndexSampler(10, 10, seed=1)}
    hp = Hyperparameters({
        "lr": HParamSpec(init=lr, transform="log10", learn="lr" in learn),
        "weight_decay": HParamSpec(init=wd, transform="log10", learn="weight_decay" in learn),
        "momentum": HParamSpec(init=mu, transform="sigmoid", learn="momentum" in learn)}, dtype=torch.float64)
    w0 = {"weight": torch.randn(1, 3, generator=g, dtype=torch.float64)}
    b0 = {"weight": torch.randn(1, 3, generator=g, dtype=torch.float64)}
    return Inner(task, hp, dict(w0), dict(b0)), (x, y, xv, yv), (lr, wd, mu)


def _drop_in(inner: Inner, values, terms: int, learn=("lr", "weight_decay", "momentum")) -> Inner:
    """The same Inner with algorithm ``ours``'s HyperSGD over its weights (one step per hyper-step)."""
    lr, wd, mu = values
    leaves = {k: v.clone().requires_grad_() for k, v in inner.w.items()}
    opt = HyperSGD(leaves.items(), lr=lr, weight_decay=wd, momentum=mu, learn=learn, terms=terms,
                   hyper_every=1, lr_bounds=(None, None))
    opt.buf = dict(inner.buf)
    return Inner(inner.task, opt.hp, leaves, inner.buf, opt=opt)


def _closed_form(inner: Inner, data, values, terms: int):
    x, y, xv, yv = data
    lr, wd, mu = values
    w0, b0 = inner.w["weight"].reshape(3, 1), inner.buf["weight"].reshape(3, 1)
    grad = 2 * x.T @ (x @ w0 - y) / len(x)
    d = mu * b0 + grad + wd * w0  # the new momentum buffer
    w1 = w0 - lr * d
    gv = 2 * xv.T @ (xv @ w1 - yv) / len(xv)
    jac = torch.eye(3, dtype=torch.float64) - lr * (2 * x.T @ x / len(x) + wd * torch.eye(3, dtype=torch.float64))
    p, term = gv.clone(), gv.clone()
    for _ in range(terms - 1):
        term = jac.T @ term
        p = p + term
    sig = mu * (1 - mu)  # d sigmoid / d logit
    du = {"lr": d * lr * LN10, "weight_decay": lr * w0 * wd * LN10, "momentum": lr * b0 * sig}
    return {k: float(-(v * p).sum()) for k, v in du.items()}, w1


@pytest.mark.parametrize("terms", [1, 3, 5])
def test_ours_matches_clarke_closed_form(terms: int) -> None:
    inner, data, values = _problem()
    expected, w1 = _closed_form(inner, data, values, terms)
    inner = _drop_in(inner, values, terms)
    hg, _ = ours(inner, weight_steps=1, terms=terms)
    for k, v in expected.items():
        assert float(hg[k]) == pytest.approx(v, rel=1e-9, abs=1e-12), k
    torch.testing.assert_close(inner.w["weight"], w1.reshape(1, 3))  # training went on


def test_one_term_equals_exact_unrolled_hypergradient_of_last_update() -> None:
    inner, data, values = _problem()
    inner = _drop_in(inner, values, 1)
    x, y, xv, yv = data
    raw = inner.hp.raw_tree()
    b0 = dict(inner.buf)

    def step(s, r, t):
        v = inner.hp.values(r)
        w = s["w"]["weight"]
        grad = 2 * x.T @ (x @ w.T - y) / len(x)
        d = v["momentum"] * b0["weight"] + grad.T + v["weight_decay"] * w
        return {"w": {"weight": w - v["lr"] * d}}

    exact = hypergrad.unrolled(step, lambda s, r: ((xv @ s["w"]["weight"].T - yv) ** 2).mean(),
                               {"w": {k: v.detach() for k, v in inner.w.items()}}, raw, steps=1)
    hg, _ = ours(inner, weight_steps=1, terms=1)
    for k in raw:
        torch.testing.assert_close(hg[k], exact.hypergrad[k])


def test_first_step_momentum_gets_zero_hypergradient() -> None:
    inner, _, values = _problem()
    inner.buf = {"weight": torch.zeros(1, 3, dtype=torch.float64)}
    hg, _ = ours(_drop_in(inner, values, 5), weight_steps=1, terms=5)
    assert float(hg["momentum"]) == 0.0 and float(hg["lr"]) != 0.0


def test_lorraine_is_the_neumann_ift_of_a_gradient_step() -> None:
    inner, data, values = _problem(learn=("weight_decay",))
    x, _y, xv, yv = data
    lr, wd, _ = values
    hg, _ = lorraine(inner, weight_steps=1, terms=4)  # one plain step, then the IFT at w1
    w = inner.w["weight"].reshape(3, 1)
    gv = 2 * xv.T @ (xv @ w - yv) / len(xv)
    jac = torch.eye(3, dtype=torch.float64) - lr * (2 * x.T @ x / len(x) + wd * torch.eye(3, dtype=torch.float64))
    p = sum(torch.linalg.matrix_power(jac.T, j) @ gv for j in range(4))
    assert float(hg["weight_decay"]) == pytest.approx(float(-(lr * w * wd * LN10 * p).sum()), rel=1e-9)


def test_baydin_through_update_writes_d_loss_d_lr_into_log_lr() -> None:
    inner, data, values = _problem(learn=("lr",))
    x, y, _, _ = data
    lr, wd, mu = values
    w0, b0 = inner.w["weight"].reshape(3, 1), inner.buf["weight"].reshape(3, 1)
    d = mu * b0 + 2 * x.T @ (x @ w0 - y) / len(x) + wd * w0
    w1 = w0 - lr * d
    g1 = 2 * x.T @ (x @ w1 - y) / len(x)
    hg, _ = baydin_through_update(inner, weight_steps=1)
    assert float(hg["lr"]) == pytest.approx(float(-(g1 * d).sum()), rel=1e-9)  # natural-lr derivative


def test_baydin_is_the_authors_raw_consecutive_gradient_product() -> None:
    """Clarke et al.'s code: −⟨∇L(w₁), ∇L(w₀)⟩ of the raw gradients, momentum and weight decay
    in the step but not in the hypergradient; the step itself is the usual update."""
    inner, data, values = _problem(learn=("lr",))
    x, y, _, _ = data
    lr, wd, mu = values
    w0, b0 = inner.w["weight"].reshape(3, 1), inner.buf["weight"].reshape(3, 1)
    g0 = 2 * x.T @ (x @ w0 - y) / len(x)
    d = mu * b0 + g0 + wd * w0
    w1 = w0 - lr * d
    g1 = 2 * x.T @ (x @ w1 - y) / len(x)
    hg, _ = baydin(inner, weight_steps=1)
    assert float(hg["lr"]) == pytest.approx(float(-(g1 * g0).sum()), rel=1e-9)
    assert float(hg["lr"]) != pytest.approx(float(-(g1 * d).sum()), rel=1e-3)
    torch.testing.assert_close(inner.w["weight"], w1.reshape(1, 3), rtol=1e-12, atol=0)
    torch.testing.assert_close(inner.buf["weight"], d.reshape(1, 3), rtol=1e-12, atol=0)
    assert inner.t == 1


def test_diff_through_opt_equals_unrolled_through_lookback() -> None:
    inner, data, _ = _problem()
    x, y, xv, yv = data
    start = {"w": dict(inner.w), "buf": dict(inner.buf)}
    raw = inner.hp.raw_tree()

    def step(s, r, t):
        v = inner.hp.values(r)
        w, b = s["w"]["weight"], s["buf"]["weight"]
        d = v["momentum"] * b + (2 * x.T @ (x @ w.T - y) / len(x)).T + v["weight_decay"] * w
        return {"w": {"weight": w - v["lr"] * d}, "buf": {"weight": d}}

    exact = hypergrad.unrolled(step, lambda s, r: ((xv @ s["w"]["weight"].T - yv) ** 2).mean(),
                               start, raw, steps=3)
    hg, _ = diff_through_opt(inner, weight_steps=3, lookback=3)
    for k in raw:
        torch.testing.assert_close(hg[k], exact.hypergrad[k])


@pytest.mark.parametrize("terms", [0, 2, 5])
def test_initial_code_variant_is_its_documented_formula(terms: int) -> None:
    """``ours_initial_code`` = ∂L_V(w₂)/∂λ + (∂Δ/∂λ)ᵀ Σ_{j≤i} (I − ∂Δ/∂w₁)ʲ ∂L_V/∂w₁ for the
    last two updates, Δ = w₂ − w₁, recomputed here from explicit matrices."""
    from bilevel.recipes.onepass.algos import ours_initial_code

    inner, (x, y, xv, yv), (lr, wd, _) = _problem()
    w0, b0 = inner.w["weight"].reshape(3, 1), inner.buf["weight"].reshape(3, 1)
    a, c, eye = 2 * x.T @ x / len(x), 2 * x.T @ y / len(x), torch.eye(3, dtype=torch.float64)

    def two_updates(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eta, lam, mu = 10 ** raw[0], 10 ** raw[1], torch.sigmoid(raw[2])
        b1 = mu * b0 + a @ w0 - c + lam * w0
        w1 = w0 - eta * b1
        b2 = mu * b1 + a @ w1 - c + lam * w1
        return w1, w1 - eta * b2

    def val_loss(w: torch.Tensor) -> torch.Tensor:
        return ((xv @ w - yv) ** 2).mean()

    raw = torch.stack([inner.hp.raw_tree()[k].detach() for k in ("lr", "weight_decay", "momentum")])
    _, w2 = two_updates(raw)
    direct = torch.func.grad(lambda r: val_loss(two_updates(r)[1]))(raw)
    d_delta = torch.autograd.functional.jacobian(lambda r: (lambda p: p[1] - p[0])(two_updates(r)), raw)
    n = -lr * (a + wd * eye)  # ∂Δ/∂w₁ (symmetric)
    v = (eye + n).T @ (2 * xv.T @ (xv @ w2 - yv) / len(xv))  # ∂L_V/∂w₁
    p = v.clone()
    for _ in range(terms):
        v = (eye - n).T @ v
        p = p + v
    expected = direct + torch.einsum("ik,i->k", d_delta.reshape(3, 3), p.reshape(3))
    hg, _ = ours_initial_code(inner, weight_steps=2, terms=terms)
    got = torch.stack([hg[k] for k in ("lr", "weight_decay", "momentum")])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(inner.w["weight"], w2.reshape(1, 3))
    assert inner.t == 2
