"""One-pass (Clarke et al.) and greedy (Baydin et al.) hypergradients against the papers'
own recipes written out by hand with torch.autograd, on real data (float64)."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_diabetes
from torch.func import grad

from bilevel import hypergrad
from tests.hypergrad.problems import Ridge

F64 = torch.float64


def _data():
    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor(x)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(y)
    y = (y - y.mean()) / y.std()
    return x[:200], y[:200], x[200:300], y[200:300]


XT, YT, XV, YV = _data()
G = torch.Generator().manual_seed(0)
W0 = {"a": 0.3 * torch.randn(10, 8, generator=G, dtype=F64), "b": 0.3 * torch.randn(8, generator=G, dtype=F64)}
BUF = {"a": 0.1 * torch.randn(10, 8, generator=G, dtype=F64), "b": 0.1 * torch.randn(8, generator=G, dtype=F64)}


def mse(w, x, y):
    return 0.5 * ((torch.tanh(x @ w["a"]) @ w["b"] - y) ** 2).mean()


def raw_hparams(per_element: bool):
    lr = torch.full((10, 8), -1.5, dtype=F64) if per_element else torch.tensor(-1.5, dtype=F64)
    return {"log_lr": lr.requires_grad_(), "log_wd": torch.tensor(-3.0, dtype=F64, requires_grad=True),
            "logit_m": torch.tensor(0.5, dtype=F64, requires_grad=True)}


def update(w, h, buf):
    """Clarke et al.'s SGD form: d = g + wd w; buf' = μ buf + d; u = lr buf'."""
    g = grad(mse)(w, XT, YT)
    wd, mu = 10 ** h["log_wd"], torch.sigmoid(h["logit_m"])
    lr = {"a": 10 ** h["log_lr"], "b": 10 ** h["log_lr"].mean()}  # per-element on "a" only
    new_buf = {k: mu * buf[k] + g[k] + wd * w[k] for k in w}
    return {k: lr[k] * new_buf[k] for k in w}, new_buf


def step(w, h, t):
    u, new_buf = update(w, h, BUF)
    return {k: w[k] - u[k] for k in w}, new_buf


def outer(w, h):
    return mse(w, XV, YV)


def clarke_by_hand(h, terms):
    """Transcription of the seed's NeumannHypergradientOptimiser."""
    w = {k: v.clone().requires_grad_() for k, v in W0.items()}
    u, _ = update(w, h, BUF)
    new = {k: (w[k] - u[k]).detach().requires_grad_() for k in w}
    gv = torch.autograd.grad(outer(new, h), list(new.values()))
    v, p = list(gv), list(gv)
    for _ in range(terms - 1):
        ju = torch.autograd.grad(list(u.values()), list(w.values()), v, retain_graph=True)
        v = [vi - ji for vi, ji in zip(v, ju, strict=False)]
        p = [pi + vi for pi, vi in zip(p, v, strict=False)]
    g = torch.autograd.grad(list(u.values()), list(h.values()), p, allow_unused=True)
    return [-gi for gi in g]


@pytest.mark.parametrize("per_element", [False, True])
@pytest.mark.parametrize("terms", [1, 5])
def test_one_pass_matches_clarke_recipe(per_element, terms):
    h = raw_hparams(per_element)
    r = hypergrad.one_pass(step, outer, W0, h, terms=terms, has_aux=True)
    expected = clarke_by_hand(h, terms)
    for got, exp in zip(r.hypergrad.values(), expected, strict=False):
        assert got.shape == exp.shape
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-14)
    # training goes on from the new state and the new momentum buffer
    u, new_buf = update(W0, {k: v.detach() for k, v in h.items()}, BUF)
    torch.testing.assert_close(r.state["a"], W0["a"] - u["a"])
    torch.testing.assert_close(r.aux["b"], new_buf["b"])


def test_one_pass_with_many_terms_near_a_minimum_approaches_the_implicit_answer():
    ridge = Ridge()
    w_star = {"w": ridge.solution(-2.0)}
    # One step from the optimum leaves it unchanged, so the series is the IFT one.
    r = hypergrad.one_pass(ridge.step, ridge.outer_loss, w_star, ridge.hparams(), terms=4000)
    assert float(r.hypergrad["log_reg"]) == pytest.approx(ridge.implicit_exact(-2.0), rel=1e-6)


def test_greedy_is_baydins_hypergradient():
    lr = torch.tensor(0.05, dtype=F64, requires_grad=True)
    xb1, yb1, xb2, yb2 = XT[:50], YT[:50], XT[50:100], YT[50:100]

    def sgd(w, h, t):
        g = grad(mse)(w, xb1, yb1)
        return {k: w[k] - h["lr"] * g[k] for k in w}

    def next_train_loss(w, h):
        return mse(w, xb2, yb2)

    r = hypergrad.greedy(sgd, next_train_loss, W0, {"lr": lr})
    g_t = grad(mse)(W0, xb1, yb1)
    g_next = grad(mse)(r.state, xb2, yb2)
    baydin = -sum((g_next[k] * g_t[k]).sum() for k in W0)
    torch.testing.assert_close(r.hypergrad["lr"], baydin, rtol=1e-12, atol=0)
