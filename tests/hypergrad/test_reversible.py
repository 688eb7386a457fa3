"""hypergrad.reversible: equal to unrolled through the same SGD-momentum run, exact reversal,
memory flat in the number of steps, and clear errors.

Tolerances. reversible runs the float trajectory rounded to 2**-bits at every step (fixed
point, ``bits=44``: 5.7e-14) and applies a momentum γ as ``round(γ 2**31) / 2**31``. With
dyadic momenta (0.875, 0.75) only the first applies: hypergradients agree with float64
unrolled to ~1e-11 relative, checked at 1e-9. With γ = 0.9 the momentum itself moves by
≤ 2.3e-10 relative, a ~1e-8 change in the hypergradient, checked at 1e-7.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.func import grad

from bilevel import hypergrad
from bilevel.errors import HypergradError, NonFiniteError
from bilevel.hypergrad import _exact
from bilevel.hypergrad.reversible import _Trajectory
from bilevel.optim import sgd
from bilevel.tree import tree_flatten
from tests.hypergrad.live_bytes import LiveBytes
from tests.hypergrad.problems import Ridge

F64 = torch.float64


def rel_err(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


def unrolled_sgd(loss_fn, outer, w0, h, *, steps, lr, momentum, weight_decay=0.0):
    """The same run as an ordinary step for hypergrad.unrolled, with bilevel.optim.sgd."""
    def step(s, hp, t):
        g = grad(lambda w: loss_fn(w, hp, t))(s["w"])
        w, opt = sgd.step(s["w"], g, s["opt"], lr=lr(hp, t), momentum=momentum(hp, t),
                          weight_decay=weight_decay(hp, t) if callable(weight_decay) else weight_decay)
        return {"w": w, "opt": opt}
    return hypergrad.unrolled(step, lambda s, hp: outer(s["w"], hp), {"w": w0, "opt": sgd.init(w0)},
                              h, steps=steps)


# --- ridge regression on diabetes ------------------------------------------------------
RIDGE = Ridge()


def ridge_loss(w, h, t):
    r = RIDGE.xt @ w["w"] - RIDGE.yt
    return 0.5 * (r * r).mean() + 0.5 * torch.exp(h["log_reg"]) * (w["w"] ** 2).sum()


def ridge_outer(w, h):
    r = RIDGE.xv @ w["w"] - RIDGE.yv
    return 0.5 * (r * r).mean()


def ridge_hparams(mom: float) -> dict:
    return {"log_reg": torch.tensor(-2.0, dtype=F64, requires_grad=True),
            "log_lr": torch.tensor(-1.5, dtype=F64, requires_grad=True),
            "mom": torch.tensor(mom, dtype=F64, requires_grad=True),
            "wd": torch.tensor(0.01, dtype=F64, requires_grad=True)}


RIDGE_W0 = {"w": torch.linspace(-0.1, 0.1, RIDGE.d, dtype=F64)}


def lr_of(h, t):
    return 10 ** h["log_lr"]


def mom_of(h, t):
    return h["mom"]


def wd_of(h, t):
    return h["wd"]


def test_ridge_equals_unrolled_for_lr_momentum_weight_decay_and_regulariser():
    h = ridge_hparams(0.875)
    r = hypergrad.reversible(ridge_loss, ridge_outer, RIDGE_W0, h, steps=150, lr=lr_of,
                             momentum=mom_of, weight_decay=wd_of)
    u = unrolled_sgd(ridge_loss, ridge_outer, RIDGE_W0, h, steps=150, lr=lr_of, momentum=mom_of,
                     weight_decay=wd_of)
    assert all(float(u.hypergrad[k].abs()) > 1e-6 for k in h)  # every one is reached
    assert rel_err(r.hypergrad, u.hypergrad) < 1e-9
    assert float((r.state["w"] - u.state["w"]["w"]).abs().max()) < 1e-11
    assert torch.allclose(r.outer_loss, u.outer_loss, rtol=1e-12, atol=0)
    assert r.info["exact"]


def test_non_dyadic_momentum_within_its_quantisation():
    h = ridge_hparams(0.9)
    r = hypergrad.reversible(ridge_loss, ridge_outer, RIDGE_W0, h, steps=150, lr=lr_of,
                             momentum=mom_of, weight_decay=wd_of)
    u = unrolled_sgd(ridge_loss, ridge_outer, RIDGE_W0, h, steps=150, lr=lr_of, momentum=mom_of,
                     weight_decay=wd_of)
    assert rel_err(r.hypergrad, u.hypergrad) < 1e-7
    assert float(_exact.quantised(torch.tensor(0.9))) != 0.9  # the test is about that gap


# --- a tiny MLP on digits: per-example weights, per-tensor and per-step schedules -------
X, Y = (torch.tensor(a) for a in load_digits(return_X_y=True))
X = X / 16.0
XT, YT, XV, YV = X[:200], Y[:200], X[200:500], Y[200:500]


def mlp_w0(dtype: torch.dtype = F64) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"l1": 0.1 * torch.randn(64, 16, generator=g).to(dtype), "b1": torch.zeros(16, dtype=dtype),
            "l2": 0.1 * torch.randn(16, 10, generator=g).to(dtype), "b2": torch.zeros(10, dtype=dtype)}


def net(w, x):
    return torch.tanh(x.to(w["l1"].dtype) @ w["l1"] + w["b1"]) @ w["l2"] + w["b2"]


def mlp_loss(w, h, t):
    i = torch.arange(20 * t % 200, 20 * t % 200 + 20)
    per_example = F.cross_entropy(net(w, XT[i]), YT[i], reduction="none")
    return (torch.sigmoid(h["example"][i]) * per_example).mean()


def mlp_outer(w, h):
    return F.cross_entropy(net(w, XV), YV)


NAMES = ("l1", "b1", "l2", "b2")


def per_tensor_per_step_lr(h, t):
    # one log-lr per weight tensor, halved after step 20; momentum per step from a vector
    return {k: 10 ** h["log_lr"][i] * (1.0 if t < 20 else 0.5) for i, k in enumerate(NAMES)}


def per_step_momentum(h, t):
    return h["mom"][t // 20]


def test_mlp_per_example_weights_per_tensor_lr_per_step_momentum_equal_unrolled():
    h = {"example": torch.zeros(200, dtype=F64, requires_grad=True),
         "log_lr": torch.tensor([-0.5, -1.0, -0.7, -1.2], dtype=F64, requires_grad=True),
         "mom": torch.tensor([0.75, 0.875], dtype=F64, requires_grad=True)}
    r = hypergrad.reversible(mlp_loss, mlp_outer, mlp_w0(), h, steps=40, lr=per_tensor_per_step_lr,
                             momentum=per_step_momentum, weight_decay=1e-3)
    u = unrolled_sgd(mlp_loss, mlp_outer, mlp_w0(), h, steps=40, lr=per_tensor_per_step_lr,
                     momentum=per_step_momentum, weight_decay=1e-3)
    assert rel_err(r.hypergrad, u.hypergrad) < 1e-9
    assert (r.hypergrad["example"] != 0).sum() == 200  # every example was used
    assert (r.hypergrad["mom"] != 0).all()


def test_grad_w0_is_the_derivative_in_the_initial_weights():
    w0 = mlp_w0()
    h = {"example": torch.zeros(200, dtype=F64, requires_grad=True)}
    r = hypergrad.reversible(mlp_loss, mlp_outer, w0, h, steps=10, lr=0.3, momentum=0.75)
    w0_var = {k: v.clone().requires_grad_() for k, v in w0.items()}
    g = torch.autograd.grad(_unrolled_loss(w0_var, h), list(w0_var.values()))
    for k, gk in zip(w0, g, strict=True):
        assert torch.allclose(r.info["grad_w0"][k], gk, rtol=1e-9, atol=1e-14)


def _unrolled_loss(w0, h):
    w, v = dict(w0), {k: torch.zeros_like(x) for k, x in w0.items()}
    for t in range(10):
        g = torch.autograd.grad(mlp_loss(w, h, t), list(w.values()), create_graph=True)
        v = {k: 0.75 * v[k] + gk for k, gk in zip(w, g, strict=True)}
        w = {k: w[k] - 0.3 * v[k] for k in w}
    return mlp_outer(w, h)


# --- exactness ---------------------------------------------------------------------------
def test_reversal_recovers_w0_and_v0_bit_for_bit():
    w0 = mlp_w0(torch.float32)  # float32 values lie on the 2**-44 grid: exact round trip
    h = {"example": torch.zeros(200, requires_grad=True)}
    leaves, w_def = tree_flatten(w0)
    traj = _Trajectory(mlp_loss, w_def, leaves, 44)
    start_w, start_v = traj.w.clone(), traj.v.clone()
    h_const = {"example": h["example"].detach()}
    scheds = (0.5, 0.9, 1e-3)
    for t in range(300):
        traj.forward(h_const, t, *(traj.values(s, h_const, t, "x") for s in scheds))
    assert not torch.equal(traj.w, start_w) and traj.buffer.spilled_bytes > 0
    zeros = [torch.zeros_like(x) for x in leaves]
    for t in reversed(range(300)):
        traj.reverse(h, [h["example"]], h_const, t, scheds, zeros, zeros)
    assert torch.equal(traj.w, start_w) and torch.equal(traj.v, start_v) and traj.buffer.empty
    for k, x in zip(w0, traj.float_leaves(traj.w), strict=True):
        assert torch.equal(x, w0[k])


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5, 0.3, 1 / 16])
def test_exact_multiply_round_trips_and_stores_the_destroyed_bits(gamma):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(-2**40, 2**40, (2000,), generator=g)
    buf, x, n = _exact.InfoBuffer(2000, x0.device), x0.clone(), _exact.numerator(torch.tensor(gamma))
    noise = [torch.randint(-2**30, 2**30, (2000,), generator=g) for _ in range(200)]
    for e in noise:  # an SGD-like mix: decay, then add something
        x = _exact.mul(x, n, buf) + e
    bits = 8 * buf.spilled_bytes / (2000 * 200)
    for e in reversed(noise):
        x = _exact.unmul(x - e, n, buf)
    assert torch.equal(x, x0) and buf.empty
    # y = floor(γx) has c = k or k + 1 preimages (1/γ = k + p); a uniform x falls in a
    # (k+1)-set with probability γp(k+1). The buffer holds E[log2 c] bits a step (2(1 - γ)
    # for γ >= 1/2), less the up to 32 bits per weight not yet spilled into words.
    k, p = int(1 / gamma), 1 / gamma - int(1 / gamma)
    expected = gamma * ((1 - p) * k * math.log2(k) + p * (k + 1) * math.log2(k + 1))
    assert expected - 32 / 200 <= bits <= expected + 0.02


def test_a_nondeterministic_loss_is_caught_not_trusted():
    def noisy(w, h, t):
        return mlp_loss(w, h, t) + 1e-3 * (torch.randn(()) * w["b2"]).sum()

    h = {"example": torch.zeros(200, dtype=F64, requires_grad=True)}
    with pytest.raises(HypergradError, match="deterministic"):
        hypergrad.reversible(noisy, mlp_outer, mlp_w0(), h, steps=20, lr=0.3, momentum=0.9)


# --- memory flat in T ----------------------------------------------------------------------
BUDGET = 8 * 2**20  # bytes of tensor storage alive at once


def test_memory_is_flat_in_steps_where_unrolled_exceeds_the_budget():
    """At T = 2000 steps of a 2410-weight MLP, unrolled would hold every step's graph
    (~37 KB a step: 75 MB); reversible holds states, one step's graph and the buffer."""
    XL, YL = X[:1000], Y[:1000]
    g = torch.Generator().manual_seed(0)
    w0 = {"l1": 0.1 * torch.randn(64, 32, generator=g, dtype=F64), "b1": torch.zeros(32, dtype=F64),
          "l2": 0.1 * torch.randn(32, 10, generator=g, dtype=F64), "b2": torch.zeros(10, dtype=F64)}

    def loss(w, h, t):
        i = slice(20 * t % 1000, 20 * t % 1000 + 20)
        return F.cross_entropy(net(w, XL[i]), YL[i])

    h = {"log_lr": torch.tensor(-1.0, dtype=F64, requires_grad=True)}

    def step(s, hp, t):  # the same run for unrolled
        gs = torch.autograd.grad(loss(s["w"], hp, t), list(s["w"].values()), create_graph=True)
        v = {k: 0.9 * s["v"][k] + gk for k, gk in zip(s["w"], gs, strict=True)}
        return {"w": {k: s["w"][k] - 10 ** hp["log_lr"] * v[k] for k in v}, "v": v}

    s0 = {"w": w0, "v": {k: torch.zeros_like(x) for k, x in w0.items()}}
    peaks = {}
    for steps in (50, 100):
        with LiveBytes() as m:
            hypergrad.unrolled(step, lambda s, hp: mlp_outer(s["w"], hp), s0, h, steps=steps)
        peaks[steps] = m.peak
    per_step = (peaks[100] - peaks[50]) / 50
    assert per_step > 0.5 * (peaks[50] / 50)  # linear in T: the graph of every step is kept
    assert peaks[100] + per_step * 1900 > BUDGET  # unrolled at T = 2000 (extrapolated)

    with LiveBytes() as m:
        r = hypergrad.reversible(loss, mlp_outer, w0, h, steps=2000, lr=lambda hp, t: 10 ** hp["log_lr"],
                                 momentum=0.9)
    assert m.peak < BUDGET and r.info["exact"]
    assert m.peak < peaks[100]  # below unrolled at 100 steps already
    assert r.info["bits_per_weight_step"] < 0.25  # 2(1 - γ) = 0.2 at γ = 0.9
    # held: coder states, word store (capacity at most twice its use), 8 bytes per step
    assert r.info["buffer_bytes"] < 2 * 0.25 * 2410 * 2000 / 8 + 8 * 2410 + 8 * 2000


# --- the contract and errors ----------------------------------------------------------------
def test_contract_inputs_untouched_no_grad_written_shapes_and_zeros_for_unreached():
    w0 = mlp_w0()
    before = {k: v.clone() for k, v in w0.items()}
    h = {"example": torch.zeros(200, dtype=F64, requires_grad=True),
         "unused": torch.ones(3, dtype=torch.float32, requires_grad=True)}
    r = hypergrad.reversible(mlp_loss, mlp_outer, w0, h, steps=5, lr=0.3, momentum=0.9)
    assert all(torch.equal(w0[k], before[k]) for k in w0)
    assert h["example"].grad is None and h["unused"].grad is None
    assert r.hypergrad["unused"].dtype == torch.float32 and torch.equal(r.hypergrad["unused"], torch.zeros(3))
    assert r.hypergrad["example"].shape == (200,)
    assert not r.state["l1"].requires_grad and not r.outer_loss.requires_grad
    assert set(r.info) >= {"grad_w0", "velocity", "buffer_bytes", "bits_per_weight_step", "exact"}


def test_errors_name_the_problem():
    h = {"example": torch.zeros(200, dtype=F64, requires_grad=True)}
    run = lambda **kw: hypergrad.reversible(mlp_loss, mlp_outer, mlp_w0(), h, **{"steps": 5, "lr": 0.3, **kw})  # noqa: E731
    with pytest.raises(NonFiniteError, match=r"momentum left \[1/16, 1\]") as e:
        run(momentum=0.01)
    assert e.value.step == 0
    with pytest.raises(NonFiniteError, match="fixed-point range") as e:
        run(lr=1e6, momentum=0.5)
    with pytest.raises(HypergradError, match="structure of w0"):
        run(momentum={"l1": 0.9})
    with pytest.raises(HypergradError, match="does not broadcast"):
        run(momentum=torch.full((3,), 0.9))
    with pytest.raises(HypergradError, match="requires_grad"):
        hypergrad.reversible(mlp_loss, mlp_outer, mlp_w0(), {"x": torch.zeros(2)}, steps=2, lr=0.1)
    with pytest.raises(ValueError, match="bits"):
        run(bits=60)
