"""One contract, run against every hypergradient method: shapes and dtypes like the
hyperparameters, inputs untouched, detached outputs, and no graph kept alive."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from sklearn.datasets import load_digits
from torch.func import grad

from bilevel import hypergrad

# The contract holds at any state; the implicit methods run here at a random one (not a
# fixed point) with a few solver iterations, so their convergence warnings are expected.
pytestmark = pytest.mark.filterwarnings("ignore::bilevel.errors.HypergradWarning")

X, Y = (torch.tensor(a) for a in load_digits(return_X_y=True))
X = X.float() / 16.0
XT, YT, XV, YV = X[:64], Y[:64], X[64:128], Y[64:128]


def state0():
    g = torch.Generator().manual_seed(0)
    return {"w": 0.1 * torch.randn(64, 10, generator=g), "b": torch.zeros(10)}


def hparams():
    # mixed forms: a scalar, a per-element tensor shaped like a parameter
    return {"log_lr": torch.tensor(-1.0, requires_grad=True),
            "wd": torch.full((64, 10), 1e-3, requires_grad=True)}


def loss(w, x, y):
    return torch.nn.functional.cross_entropy(x @ w["w"] + w["b"], y)


WD = torch.full((64, 10), 1e-3)


def step(s, h, t):
    wd = h.get("wd", WD)  # forward/exact are asked for the scalar only
    g = grad(lambda w: loss(w, XT, YT) + 0.5 * (wd * w["w"] ** 2).sum())(s)
    lr = torch.exp(h["log_lr"])
    return {k: s[k] - lr * g[k] for k in s}


def outer(s, h):
    return loss(s, XV, YV)


METHODS = {
    "unrolled": lambda s, h: hypergrad.unrolled(step, outer, s, h, steps=3),
    "truncated": lambda s, h: hypergrad.unrolled(step, outer, s, h, steps=3, truncate=1),
    "checkpointed": lambda s, h: hypergrad.unrolled(step, outer, s, h, steps=3, checkpoint=True),
    "forward": lambda s, h: hypergrad.forward(step, outer, s, {"log_lr": h["log_lr"]}, steps=3),
    "neumann": lambda s, h: hypergrad.implicit(step, outer, s, h, terms=4),
    "cg": lambda s, h: hypergrad.implicit(step, outer, s, h, solver="cg", iters=3),
    "identity": lambda s, h: hypergrad.implicit(step, outer, s, h, solver="identity"),
    "exact": lambda s, h: hypergrad.implicit(step, outer, s, {"log_lr": h["log_lr"]}, solver="exact"),
    "one_pass": lambda s, h: hypergrad.one_pass(step, outer, s, h, terms=3),
    "greedy": lambda s, h: hypergrad.greedy(step, outer, s, h),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_contract(name):
    s, h = state0(), hparams()
    s_copy = {k: v.clone() for k, v in s.items()}
    h_copy = {k: v.detach().clone() for k, v in h.items()}
    r = METHODS[name](s, h)
    # result shaped and typed like the hyperparameters it was asked for
    for k, g in r.hypergrad.items():
        assert g.shape == h[k].shape and g.dtype == h[k].dtype, k
        assert torch.isfinite(g).all()
        assert g.grad_fn is None
    assert any(float(g.abs().sum()) > 0 for g in r.hypergrad.values())
    # final state: same structure, detached; outer loss a detached scalar
    assert set(r.state) == set(s)
    assert all(v.grad_fn is None and not v.requires_grad for v in r.state.values())
    assert r.outer_loss.shape == () and r.outer_loss.grad_fn is None
    # nothing the caller passed was modified, and no .grad was written
    for k in s:
        assert torch.equal(s[k], s_copy[k])
    for k in h:
        assert torch.equal(h[k].detach(), h_copy[k]) and h[k].grad is None


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some torch module proxies warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("name", ["unrolled", "checkpointed", "forward", "neumann", "one_pass"])
def test_no_graph_leak_over_200_calls(name):
    s, h = state0(), hparams()
    for _ in range(5):  # warm up caches
        METHODS[name](s, h)
    before = _live_tensors()
    for _ in range(200):
        r = METHODS[name](s, h)
    del r
    assert _live_tensors() - before <= 5
