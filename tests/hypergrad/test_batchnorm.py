"""The BatchNorm / buffer policy of bilevel.functional inside every method (float64)."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_diabetes
from torch import nn
from torch.func import grad

from bilevel import hypergrad
from bilevel.functional import call, module_state


@pytest.fixture
def problem():
    torch.manual_seed(0)
    x, y = load_diabetes(return_X_y=True)
    x, y = torch.tensor(x), torch.tensor(y)
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1)).double()
    params, buffers = module_state(model)

    def train_loss(p, b, h, xb, yb):
        out, new_b = call(model, p, b, xb)
        return ((out.squeeze(-1) - yb) ** 2).mean() + torch.exp(h["log_wd"]) * sum(
            (v * v).sum() for v in p.values()
        ), new_b

    def step(state, h, t):
        xb, yb = x[(t % 4) * 64 : (t % 4 + 1) * 64], y[(t % 4) * 64 : (t % 4 + 1) * 64]
        g, new_b = grad(train_loss, has_aux=True)(state["params"], state["buffers"], h, xb, yb)
        return {"params": {k: v - 0.05 * g[k] for k, v in state["params"].items()}, "buffers": new_b}

    def outer(state, h):
        out, _ = call(model, state["params"], state["buffers"], x[300:])
        return ((out.squeeze(-1) - y[300:]) ** 2).mean()

    state0 = {"params": params, "buffers": buffers}
    return step, outer, state0


def hp(v=-3.0):
    return {"log_wd": torch.tensor(v, dtype=torch.float64, requires_grad=True)}


def test_unrolled_through_batchnorm_matches_finite_differences(problem):
    step, outer, state0 = problem
    before = {k: v.clone() for k, v in state0["buffers"].items()}
    r = hypergrad.unrolled(step, outer, state0, hp(), steps=8)
    for k, v in state0["buffers"].items():  # the caller's running statistics are untouched
        assert torch.equal(v, before[k])
    assert int(r.state["buffers"]["1.num_batches_tracked"]) == 8
    assert not torch.equal(r.state["buffers"]["1.running_mean"], before["1.running_mean"])

    def value(v):
        with torch.no_grad():
            s = state0
            for t in range(8):
                s = step(s, {"log_wd": torch.tensor(v, dtype=torch.float64)}, t)
            return float(outer(s, None))

    eps = 1e-6
    fd = (value(-3.0 + eps) - value(-3.0 - eps)) / (2 * eps)
    assert float(r.hypergrad["log_wd"]) == pytest.approx(fd, rel=1e-6)


def test_checkpointed_and_forward_agree_with_batchnorm(problem):
    step, outer, state0 = problem
    plain = hypergrad.unrolled(step, outer, state0, hp(), steps=8)
    ck = hypergrad.unrolled(step, outer, state0, hp(), steps=8, checkpoint=True, segment=3)
    fw = hypergrad.forward(step, outer, state0, hp(), steps=8)
    for other in (ck, fw):
        assert abs(float(other.hypergrad["log_wd"] - plain.hypergrad["log_wd"])) <= 1e-12
        torch.testing.assert_close(other.state["buffers"], plain.state["buffers"], rtol=0, atol=1e-12)

