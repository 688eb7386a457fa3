"""AliG: hand-computed steps and edge cases (both faces), Optimizer/functional parity on a
real regression problem, projection, state_dict, schedulers, errors, hypergradients."""

from __future__ import annotations

import copy

import pytest
import torch
from sklearn.datasets import load_diabetes

from bilevel.errors import ConfigError
from bilevel.optim import AliG, alig, l2_projection, project_l2_ball

D = torch.float64
P = {"a": [1.0, 2.0], "b": [3.0]}
G = {"a": [0.5, -1.0], "b": [2.0]}  # |g|^2 = 5.25
B0 = {"a": [1.0, -1.0], "b": [0.4]}  # a previous momentum buffer


def _t(d: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=D) for k, v in d.items()}


def _step(face: str, *, loss: float, grads=G, **options):
    """One step from P with buffer B0 through either face; returns (params, γ, γ_u)."""
    if face == "functional":
        state = alig.init(_t(P))._replace(momentum_buffer=_t(B0))
        params, state = alig.step(_t(P), _t(grads), state, loss=torch.tensor(loss, dtype=D),
                                  **options)
        return params, float(state.step_size), float(state.step_size_unclipped)
    params = {k: v.requires_grad_(True) for k, v in _t(P).items()}
    opt = AliG(list(params.values()), **options)
    for k, p in params.items():
        p.grad = _t(grads)[k]
        opt.state[p]["momentum_buffer"] = _t(B0)[k]
    opt.step(loss=loss)
    return ({k: p.detach() for k, p in params.items()}, float(opt.step_size),
            float(opt.step_size_unclipped))


# (options, γ, expected params) by hand with loss 2.1, eps 0: γ_u = 2.1 / 5.25 = 0.4.
HAND = [
    ({}, 0.4, {"a": [0.8, 2.4], "b": [2.2]}),
    ({"max_lr": 0.1}, 0.1, {"a": [0.95, 2.1], "b": [2.8]}),
    # standard: b = .5 b0 - γ g = ([.3, -.1], [-.6]); p = p - γ g + .5 b
    ({"momentum": 0.5}, 0.4, {"a": [0.95, 2.35], "b": [1.9]}),
    # clipped: b = ([.45, -.4], [0]); p = p - .1 g + .5 b
    ({"momentum": 0.5, "max_lr": 0.1}, 0.1, {"a": [1.175, 1.9], "b": [2.8]}),
    # adjusted: b = .5 b0 - g = ([0, .5], [-1.8]); p = p - γ g + .5 γ b
    ({"momentum": 0.5, "adjusted_momentum": True}, 0.4, {"a": [0.8, 2.5], "b": [1.84]}),
    ({"momentum": 0.5, "adjusted_momentum": True, "max_lr": 0.1}, 0.1,
     {"a": [0.95, 2.125], "b": [2.71]}),
]
FACES = ("functional", "optimizer")


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize(("options", "gamma", "expected"), HAND)
def test_hand_computed_step(face, options, gamma, expected):
    params, step_size, unclipped = _step(face, loss=2.1, eps=0.0, **options)
    assert step_size == pytest.approx(gamma) and unclipped == pytest.approx(0.4)
    for k, v in expected.items():
        torch.testing.assert_close(params[k], torch.tensor(v, dtype=D))


@pytest.mark.parametrize("face", FACES)
def test_default_eps_enters_the_denominator(face):
    _, _, unclipped = _step(face, loss=2.1)
    assert unclipped == pytest.approx(2.1 / (5.25 + 1e-5), rel=1e-14)


@pytest.mark.parametrize("face", FACES)
def test_zero_loss_takes_no_gradient_step_but_momentum_moves(face):
    params, gamma, _ = _step(face, loss=0.0, momentum=0.5)
    assert gamma == 0.0  # b = .5 b0; p = p + .5 b
    torch.testing.assert_close(params["a"], torch.tensor([1.25, 1.75], dtype=D))
    torch.testing.assert_close(params["b"], torch.tensor([3.1], dtype=D))
    # adjusted momentum scales the buffer by γ = 0: nothing moves
    params, _, _ = _step(face, loss=0.0, momentum=0.5, adjusted_momentum=True)
    torch.testing.assert_close(params, _t(P))


@pytest.mark.parametrize("face", FACES)
def test_zero_gradient(face):
    zero = {"a": [0.0, 0.0], "b": [0.0]}
    params, gamma, unclipped = _step(face, loss=2.0, grads=zero, max_lr=0.1)
    assert unclipped == pytest.approx(2.0 / 1e-5) and gamma == pytest.approx(0.1)
    torch.testing.assert_close(params, _t(P))
    # Without max_lr the step size is loss / eps: huge but finite (documented risk).
    params, gamma, _ = _step(face, loss=2.0, grads=zero)
    assert gamma == pytest.approx(2e5)
    torch.testing.assert_close(params, _t(P))


@pytest.mark.parametrize("face", FACES)
def test_negative_loss_ascends(face):
    params, gamma, _ = _step(face, loss=-2.1, eps=0.0, max_lr=0.1)
    assert gamma == pytest.approx(-0.4)  # the cap only bounds from above
    torch.testing.assert_close(params["a"], torch.tensor([1.2, 1.6], dtype=D))


def _diabetes():
    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor(x, dtype=D)
    y = torch.tensor(y, dtype=D)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    return x, y


X, Y = _diabetes()
BATCHES = torch.randperm(len(X), generator=torch.Generator().manual_seed(0)).split(32)


def mse(params: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    return (X[idx] @ params["w"] + params["b"] - Y[idx]).pow(2).mean()


@pytest.mark.parametrize("projection", [None, 0.5])
@pytest.mark.parametrize("max_lr", [None, {"w": 0.1, "b": 0.05}])
@pytest.mark.parametrize("momentum", ["none", "standard", "adjusted"])
def test_optimizer_matches_functional_over_50_steps(momentum, max_lr, projection):
    mu = 0.0 if momentum == "none" else 0.9
    adjusted = momentum == "adjusted"
    init = {"w": 0.1 * torch.ones(10, dtype=D), "b": torch.zeros((), dtype=D)}
    # Optimizer face: one group per tensor, each with its own max_lr.
    leaves = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    groups = [{"params": [leaves[k]], **({"max_lr": max_lr[k]} if max_lr else {})}
              for k in leaves]
    opt = AliG(groups, momentum=mu, adjusted_momentum=adjusted,
               projection_fn=l2_projection(leaves, projection))
    # Functional face: the same maths with a per-tensor max_lr.
    params = project_l2_ball(init, max_norm=projection)
    state = alig.init(params)
    for t in range(50):
        idx = BATCHES[t % len(BATCHES)]
        opt.zero_grad()
        loss = mse(leaves, idx)
        loss.backward()
        opt.step(loss=loss)

        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        f_loss = mse(p, idx)
        grads = dict(zip(p, torch.autograd.grad(f_loss, list(p.values())), strict=True))
        params, state = alig.step(params, grads, state, loss=f_loss.detach(), max_lr=max_lr,
                                  momentum=mu, adjusted_momentum=adjusted)
        params = project_l2_ball(params, max_norm=projection)
        for k in params:
            torch.testing.assert_close(leaves[k].detach(), params[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.step_size, state.step_size, rtol=1e-12, atol=0)
        torch.testing.assert_close(opt.step_size_unclipped, state.step_size_unclipped,
                                   rtol=1e-12, atol=0)
    if max_lr is not None:  # uncapped, adjusted momentum (step ~ γ/(1-μ)) can diverge here
        assert mse(params, torch.arange(len(X))) < mse(init, torch.arange(len(X)))


def test_projection_keeps_the_norm_bound():
    w = torch.full((10,), 3.0, dtype=D, requires_grad=True)
    opt = AliG([w], max_lr=10.0, projection_fn=l2_projection([w], max_norm=2.0))
    assert float(w.detach().norm()) == pytest.approx(2.0)  # projected at construction
    for t in range(10):
        opt.zero_grad()
        loss = mse({"w": w, "b": torch.zeros((), dtype=D)}, BATCHES[t])
        loss.backward()
        opt.step(loss=loss)
        assert float(w.detach().norm()) <= 2.0 + 1e-12


def test_project_l2_ball():
    inside = {"a": torch.tensor([0.3, 0.4], dtype=D)}
    torch.testing.assert_close(project_l2_ball(inside, max_norm=1.0), inside)
    outside = {"a": torch.tensor([3.0], dtype=D), "b": torch.tensor([4.0], dtype=D)}
    out = project_l2_ball(outside, max_norm=1.0)  # jointly: norm 5 -> 1
    torch.testing.assert_close(out, {"a": torch.tensor([0.6], dtype=D),
                                     "b": torch.tensor([0.8], dtype=D)})
    assert project_l2_ball(outside, max_norm=None) == outside
    origin = torch.zeros(3, dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(project_l2_ball({"a": origin}, max_norm=1.0)["a"].sum(), origin)
    assert torch.isfinite(g).all()
    with pytest.raises(ConfigError, match="max_norm must be > 0"):
        l2_projection([origin], max_norm=0.0)


def _train(model: torch.nn.Linear, opt: AliG, steps: range) -> list[torch.Tensor]:
    out = []
    for t in steps:
        idx = BATCHES[t % len(BATCHES)]

        def closure(idx=idx):
            opt.zero_grad()
            loss = (model(X[idx]).squeeze(-1) - Y[idx]).pow(2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return out


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 1).double()
    opt = AliG(model.parameters(), max_lr=0.1, momentum=0.9, adjusted_momentum=True)
    _train(model, opt, range(10))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    expected = _train(model, opt, range(10, 20))

    clone = torch.nn.Linear(10, 1).double()
    clone.load_state_dict(saved_model)
    opt2 = AliG(clone.parameters(), max_lr=5.0)  # overwritten by the loaded groups
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["momentum"] == 0.9
    got = _train(clone, opt2, range(10, 20))
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


def test_scheduler_schedules_max_lr():
    w = torch.ones(2, dtype=D, requires_grad=True)
    opt = AliG([w], max_lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for k in range(3):
        w.grad = torch.full_like(w, 1e-3)  # γ_u = 100 / 2e-6: always clipped
        opt.step(loss=100.0)
        assert float(opt.step_size) == 0.5**k
        assert opt.param_groups[0]["max_lr"] == opt.param_groups[0]["lr"] == 0.5**k
        sched.step()


def test_closure_returns_the_loss_and_matches_loss_keyword():
    w1 = torch.ones(2, dtype=D, requires_grad=True)
    w2 = torch.ones(2, dtype=D, requires_grad=True)
    opt1, opt2 = AliG([w1], max_lr=0.5), AliG([w2], max_lr=0.5)

    def closure():
        opt1.zero_grad()
        loss = (w1 - 3).pow(2).sum()
        loss.backward()
        return loss

    returned = opt1.step(closure)
    loss2 = (w2 - 3).pow(2).sum()
    loss2.backward()
    opt2.step(loss=float(loss2.detach()))
    assert float(returned.detach()) == float(loss2.detach())
    assert torch.equal(w1, w2)


def test_errors():
    w = torch.ones(2, requires_grad=True)
    w.grad = torch.ones(2)
    opt = AliG([w], max_lr=0.1)
    with pytest.raises(ConfigError, match="needs the current mini-batch loss"):
        opt.step()
    with pytest.raises(ConfigError, match="not both"):
        opt.step(lambda: 1.0, loss=1.0)
    with pytest.raises(ConfigError, match="max_lr must be > 0"):
        AliG([w], max_lr=0.0)
    with pytest.raises(ConfigError, match="max_lr must be > 0"):
        AliG([{"params": [w], "max_lr": -1.0}])
    with pytest.raises(ConfigError, match="momentum must lie"):
        AliG([w], momentum=-0.1)
    with pytest.raises(ConfigError, match="aliases"):
        AliG([{"params": [w], "max_lr": 0.1, "lr": 0.2}])


def _unrolled_val_loss(max_lr, momentum, steps: int = 5) -> torch.Tensor:
    params = {"w": torch.zeros(10, dtype=D, requires_grad=True),
              "b": torch.zeros((), dtype=D, requires_grad=True)}
    state = alig.init(params)
    for t in range(steps):
        loss = mse(params, BATCHES[t])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params, state = alig.step(params, dict(zip(params, grads, strict=True)), state,
                                  loss=loss, max_lr=max_lr, momentum=momentum)
        if max_lr is not None:  # stay in the clipped regime, away from the kink
            assert float((state.step_size_unclipped - 1.5 * state.step_size).detach()) > 0
    return mse(params, BATCHES[-2])


@pytest.mark.parametrize("wrt", ["max_lr", "momentum"])
def test_hypergradient_matches_central_differences(wrt):
    base = {"max_lr": 0.02, "momentum": 0.9} if wrt == "max_lr" else \
        {"max_lr": None, "momentum": 0.5}
    h = torch.tensor(base[wrt], dtype=D, requires_grad=True)
    (analytic,) = torch.autograd.grad(_unrolled_val_loss(**{**base, wrt: h}), [h])
    eps = 1e-6
    plus = _unrolled_val_loss(**{**base, wrt: base[wrt] + eps}).detach()
    minus = _unrolled_val_loss(**{**base, wrt: base[wrt] - eps}).detach()
    numeric = (plus - minus) / (2 * eps)
    assert abs(float(analytic)) > 1e-3  # the test is not vacuous
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-10)
