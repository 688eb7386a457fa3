"""The differentiable optimisers of bilevel.compat.higher against torch.optim, in float64.

Each optimiser, with several option sets, trains a patched copy of a model beside
``torch.optim`` training the model itself on the same batches: the trajectories must agree
to rounding at every step. The torch optimiser first takes two steps on its own, so the
differentiable twin must also pick up its state (buffers, step counts) where it was.
Learnable (tensor) settings are checked against central finite differences.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn, optim

import bilevel.compat.higher as higher

CASES = [
    (optim.SGD, {"lr": 0.1}),
    (optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    (optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "maximize": True}),
    (optim.Adam, {"lr": 0.01}),
    (optim.Adam, {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}),
    (optim.Adam, {"lr": 0.01, "amsgrad": True, "maximize": True}),
    (optim.Adam, {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    (optim.AdamW, {"lr": 0.01}),
    (optim.AdamW, {"lr": 0.01, "weight_decay": 0.3, "amsgrad": True}),
    (optim.Adamax, {"lr": 0.01}),
    (optim.Adamax, {"lr": 0.01, "betas": (0.7, 0.9), "weight_decay": 0.1}),
    (optim.Adagrad, {"lr": 0.05}),
    (optim.Adagrad, {"lr": 0.05, "lr_decay": 0.1, "initial_accumulator_value": 0.5}),
    (optim.Adagrad, {"lr": 0.05, "weight_decay": 0.1, "eps": 1e-6}),
    (optim.Adadelta, {"lr": 1.0}),
    (optim.Adadelta, {"lr": 0.5, "rho": 0.8, "weight_decay": 0.1}),
    (optim.ASGD, {"lr": 0.05}),
    (optim.ASGD, {"lr": 0.05, "lambd": 0.01, "alpha": 0.5, "t0": 2.0, "weight_decay": 0.1}),
    (optim.RMSprop, {"lr": 0.01}),
    (optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "weight_decay": 0.1}),
    (optim.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.3, "alpha": 0.9}),
    (optim.Rprop, {"lr": 0.01}),
    (optim.Rprop, {"lr": 0.01, "etas": (0.3, 1.5), "step_sizes": (1e-3, 0.02), "maximize": True}),
]


def _ids(case):
    cls, kw = case
    return cls.__name__ + "-" + "-".join(f"{k}={v}" for k, v in kw.items() if k != "lr")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 3, generator=g, dtype=torch.float64),
         torch.randn(8, 2, generator=g, dtype=torch.float64))
        for _ in range(n)
    ]


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def _groups(model: nn.Module, lr: float) -> list[dict]:
    first, second = list(model[0].parameters()), list(model[2].parameters())
    return [{"params": first, "lr": 2 * lr}, {"params": second}]


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("grouped", [False, True], ids=["one-group", "two-groups"])
def test_trajectory_matches_torch_optim(case, grouped):
    cls, kw = case
    model = _model()
    params = _groups(model, kw["lr"]) if grouped else model.parameters()
    opt = cls(params, **kw)
    data = _batches(8)
    for x, y in data[:2]:  # torch trains alone first: its state must be carried over
        opt.zero_grad()
        _loss(model(x), y).backward()
        opt.step()
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for x, y in data[2:]:
            opt.zero_grad()
            _loss(model(x), y).backward()
            opt.step()
            diffopt.step(_loss(fmodel(x), y))
            for p, fp in zip(model.parameters(), fmodel.parameters(), strict=True):
                torch.testing.assert_close(fp, p.detach(), rtol=1e-11, atol=1e-13)
        if cls is optim.ASGD:  # the running average as well
            ours = [s["ax"] for g in diffopt.state for s in g.values()]
            theirs = [opt.state[p]["ax"] for g in opt.param_groups for p in g["params"]]
            for a, b in zip(ours, theirs, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def _unroll(cls, kw, override, steps=4, seed=0):
    """Outer loss after ``steps`` differentiable steps with settings ``override``."""
    model = _model(seed)
    opt = cls(model.parameters(), **kw)
    data = _batches(steps + 1, seed=3)
    with higher.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
        for x, y in data[:-1]:
            diffopt.step(_loss(fmodel(x), y))
        return _loss(fmodel(data[-1][0]), data[-1][1])


LR_CASES = [(cls, kw) for cls, kw in CASES if not kw.get("maximize")]


@pytest.mark.parametrize("case", LR_CASES[::2], ids=_ids)
def test_tensor_lr_gets_the_finite_difference_gradient(case):
    cls, kw = case
    lr = torch.tensor(kw["lr"], dtype=torch.float64, requires_grad=True)
    loss = _unroll(cls, kw, {"lr": [lr]})
    (g,) = torch.autograd.grad(loss, lr)
    plain = _unroll(cls, kw, None)
    # with number settings ASGD rounds its eta to torch's float32 scalar state, as torch does
    rel = 1e-8 if cls is optim.ASGD else 1e-12
    assert float(loss.detach()) == pytest.approx(float(plain.detach()), rel=rel)
    eps = 1e-6 * kw["lr"]
    up = _unroll(cls, kw, {"lr": [torch.tensor(kw["lr"] + eps, dtype=torch.float64)]})
    down = _unroll(cls, kw, {"lr": [torch.tensor(kw["lr"] - eps, dtype=torch.float64)]})
    fd = float((up - down).detach()) / (2 * eps)
    assert abs(fd) > 1e-6, "the check needs a loss that depends on lr"
    assert float(g) == pytest.approx(fd, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize(
    "cls, kw, key, value",
    [
        (optim.SGD, {"lr": 0.1, "momentum": 0.5}, "momentum", 0.5),
        (optim.SGD, {"lr": 0.1, "weight_decay": 0.1}, "weight_decay", 0.1),
        (optim.Adam, {"lr": 0.01}, "betas", (0.9, 0.99)),
        (optim.RMSprop, {"lr": 0.01}, "alpha", 0.9),
        (optim.Adadelta, {"lr": 1.0}, "rho", 0.8),
    ],
)
def test_other_tensor_settings_get_finite_difference_gradients(cls, kw, key, value):
    def settings(v, grad):
        leaves = [torch.tensor(x, dtype=torch.float64, requires_grad=grad) for x in v]
        return leaves, {key: [tuple(leaves)]}

    values = value if isinstance(value, tuple) else (value,)
    unpack = (lambda s: s) if isinstance(value, tuple) else (lambda s: {key: [s[key][0][0]]})
    leaves, override = settings(values, True)
    grads = torch.autograd.grad(_unroll(cls, kw, unpack(override)), leaves)
    for i, g in enumerate(grads):
        eps = 1e-6
        shifted = [list(values), list(values)]
        shifted[0][i] += eps
        shifted[1][i] -= eps
        up = _unroll(cls, kw, unpack(settings(shifted[0], False)[1]))
        down = _unroll(cls, kw, unpack(settings(shifted[1], False)[1]))
        fd = float((up - down).detach()) / (2 * eps)
        assert float(g) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_override_per_group_and_at_step_time():
    model = _model()
    opt = optim.SGD(_groups(model, 0.1), lr=0.1)
    lrs = [torch.tensor(0.2, dtype=torch.float64, requires_grad=True),
           torch.tensor(0.05, dtype=torch.float64, requires_grad=True)]
    (x, y), (xv, yv) = _batches(2)
    with higher.innerloop_ctx(model, opt, override={"lr": lrs}) as (fmodel, diffopt):
        assert [g["lr"] for g in diffopt.param_groups] == lrs
        diffopt.step(_loss(fmodel(x), y))
        late = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        diffopt.step(_loss(fmodel(x), y), override={"lr": [late]})
        g = torch.autograd.grad(_loss(fmodel(xv), yv), [*lrs, late])
    assert all(float(v) != 0.0 for v in g)
    assert opt.param_groups[0]["lr"] == 0.2  # the torch optimiser is never changed


def test_bad_override_and_unsupported_optimiser_are_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match="override key 'lrr'"):
        higher.optim.get_diff_optim(optim.SGD(model.parameters(), lr=0.1), model.parameters(),
                                    override={"lrr": [0.1]})
    with pytest.raises(ValueError, match="one per parameter group"):
        higher.optim.get_diff_optim(optim.SGD(_groups(model, 0.1), lr=0.1), model.parameters(),
                                    override={"lr": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match=r"LBFGS not supported.*register_optim"):
        higher.optim.get_diff_optim(optim.LBFGS(model.parameters()), model.parameters())


def test_register_optim_and_create_diff_optim():
    class Halving(optim.SGD):
        pass

    class DifferentiableHalving(higher.optim.DifferentiableOptimizer):
        def _rule(self, p, g, state, group):
            return p - 0.5 * group["lr"] * g

    higher.register_optim(Halving, DifferentiableHalving)
    try:
        model = _model()
        fmodel = higher.monkeypatch(model)
        diffopt = higher.create_diff_optim(Halving, {"lr": 0.2}, fmodel=fmodel)
        x, y = _batches(1)[0]
        before = list(fmodel.parameters())
        loss = _loss(fmodel(x), y)
        grads = torch.autograd.grad(loss, before, retain_graph=True)
        new = diffopt.step(loss)
        for p, g, q in zip(before, grads, new, strict=True):
            torch.testing.assert_close(q, p - 0.1 * g)
    finally:
        higher.optim._opt_mapping.pop(Halving)


def test_grad_callback_scales_gradients_before_the_update():
    # for plain SGD, gradients x0.5 are the same as lr x0.5 (exactly); a callback given to
    # step() replaces the one given to the constructor
    data = _batches(3)

    def run(lr, callback=None, step_callback=None):
        model = _model()
        fmodel = higher.monkeypatch(model)
        diffopt = higher.optim.get_diff_optim(optim.SGD(model.parameters(), lr=lr),
                                              model.parameters(), fmodel, grad_callback=callback)
        for x, y in data:
            diffopt.step(_loss(fmodel(x), y), grad_callback=step_callback)
        return list(fmodel.parameters())

    half = run(0.1, callback=lambda gs: [g * 0.5 for g in gs])
    for a, b in zip(half, run(0.05), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
    replaced = run(0.1, callback=lambda gs: [g * 0.5 for g in gs], step_callback=lambda gs: gs)
    for a, b in zip(replaced, run(0.1), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_subclass_written_against_highers_update_protocol_works():
    class DifferentiableSignSGD(higher.optim.DifferentiableOptimizer):
        def _update(self, grouped_grads, **kwargs):
            for group, grads in zip(self.param_groups, grouped_grads, strict=True):
                for i, (p, g) in enumerate(zip(group["params"], grads, strict=True)):
                    if g is not None:
                        group["params"][i] = p - group["lr"] * torch.tanh(g)

    model = _model()
    x, y = _batches(1)[0]
    fmodel = higher.monkeypatch(model)
    diffopt = DifferentiableSignSGD(optim.SGD(model.parameters(), lr=0.1), model.parameters(), fmodel)
    loss = _loss(fmodel(x), y)
    grads = torch.autograd.grad(loss, list(fmodel.parameters()), retain_graph=True)
    diffopt.step(loss)
    for p, g, q in zip(model.parameters(), grads, fmodel.parameters(), strict=True):
        torch.testing.assert_close(q, p - 0.1 * torch.tanh(g))


def test_create_diff_optim_with_explicit_params_and_no_model():
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    diffopt = higher.create_diff_optim(optim.SGD, {"lr": 0.5, "momentum": 0.5}, params=[w])
    params = [w]
    for _ in range(2):
        params = diffopt.step((params[0] ** 2).sum(), params=params)
    # w1 = w - 0.5*2w = 0; buf1 = 2w; w2 = 0 - 0.5*(0.5*2w + 0) = -0.5w
    torch.testing.assert_close(params[0], -0.5 * w.detach())
    (g,) = torch.autograd.grad(params[0].sum(), w)
    torch.testing.assert_close(g, torch.full_like(w, -0.5))


def test_trainable_settings_round_trip():
    model = _model()
    opt = optim.Adam(_groups(model, 0.1), lr=0.1)
    override = higher.optim.get_trainable_opt_params(opt)
    assert set(override) == {"lr", "betas", "eps", "weight_decay"}  # flags are not learnable
    assert all(t.requires_grad for t in higher.utils.flatten(dict(override)))
    override["lr"][0] = torch.tensor(0.5)
    other = optim.Adam(_groups(model, 0.1), lr=3.0)
    higher.optim.apply_trainable_opt_params(other, override)
    assert other.param_groups[0]["lr"] == pytest.approx(0.5)
    assert other.param_groups[1]["lr"] == pytest.approx(0.1)
    assert type(other.param_groups[0]["betas"]) is tuple
    assert other.param_groups[0]["betas"] == pytest.approx((0.9, 0.999))


def test_frozen_and_unused_parameters_are_left_alone():
    model = _model()
    model[0].weight.requires_grad_(False)
    opt = optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = _batches(1)[0]
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(_loss(fmodel(x), y))
        diffopt.step(model[2].bias.sum() * 0 + _loss(fmodel(x), y))
        after = list(fmodel.parameters())
    assert torch.equal(after[0], model[0].weight)
    assert not torch.equal(after[1], model[0].bias)
    assert all(s["step"] == 2 for s in diffopt.state[0].values())
