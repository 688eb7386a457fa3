"""The functional rules are differentiable: gradcheck w.r.t. every hyperparameter form,
params and state; finite Adam hypergradients at exact-zero gradients; no input mutation;
torch.func transforms; call-time validation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.autograd import gradcheck

from bilevel.errors import ConfigError
from bilevel.optim import adam, alig, resolve, safe_sqrt, sgd
from bilevel.tree import tree_flatten

D = torch.float64


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g, dtype=D)
    y = torch.randn(8, 2, generator=g, dtype=D)
    params = {"w": 0.5 * torch.randn(2, 3, generator=g, dtype=D),
              "b": 0.5 * torch.randn(2, generator=g, dtype=D)}
    return x, y, params


X, Y, P0 = _data()


def loss_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return (torch.tanh(X @ p["w"].T + p["b"]) - Y).pow(2).mean()


def unroll(rule, params, hparams: dict[str, Any], steps: int = 3, state=None):
    """``steps`` differentiable steps (grads with create_graph); AliG also gets the loss."""
    state = rule.init(params) if state is None else state
    # Constant starting params still need a graph for the inner gradient.
    params = {n: p if p.requires_grad else p.detach().requires_grad_(True)
              for n, p in params.items()}
    for _ in range(steps):
        loss = loss_fn(params)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        extra = {"loss": loss} if rule is alig else {}
        params, state = rule.step(params, dict(zip(params, grads, strict=True)), state,
                                  **hparams, **extra)
    return params, state


def flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


# (rule, fixed options, hyperparameter under test, its value)
GRADCHECK = [
    (sgd, {"lr": 0.1, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.05}, "lr", 0.1),
    (sgd, {"lr": 0.1, "momentum": 0.9, "dampening": 0.2}, "momentum", 0.9),
    (sgd, {"lr": 0.1, "momentum": 0.9, "dampening": 0.2}, "dampening", 0.2),
    (sgd, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, "weight_decay", 0.05),
    (sgd, {"lr": 0.1, "decoupled_weight_decay": True}, "weight_decay", 0.05),
    (adam, {"lr": 0.05}, "lr", 0.05),
    (adam, {"lr": 0.05, "amsgrad": True}, "beta1", 0.8),
    (adam, {"lr": 0.05}, "beta2", 0.9),
    (adam, {"lr": 0.05}, "eps", 1e-2),
    (adam, {"lr": 0.05, "weight_decay": 0.1}, "weight_decay", 0.1),
    (adam, {"lr": 0.05, "decoupled_weight_decay": True}, "weight_decay", 0.1),
    (alig, {"max_lr": 0.05, "momentum": 0.9}, "max_lr", 0.05),
    (alig, {"momentum": 0.5, "eps": 1.0}, "momentum", 0.5),
    (alig, {"max_lr": 0.05, "momentum": 0.5, "adjusted_momentum": True}, "momentum", 0.5),
]
FORMS = ("tensor", "per_tensor", "per_element")


def _set(options: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    out = dict(options)
    if name.startswith("beta"):
        betas = list(out.get("betas", (0.9, 0.999)))
        betas[int(name[-1]) - 1] = value
        out["betas"] = tuple(betas)
    else:
        out[name] = value
    return out


def _form(form: str, value: float) -> tuple[list[torch.Tensor], Callable[..., Any]]:
    """Leaves for gradcheck and a function building the hyperparameter from them."""
    if form == "tensor":
        return [torch.tensor(value, dtype=D)], lambda t: t
    names = list(P0)
    if form == "per_tensor":
        leaves = [torch.tensor(value * (1 + 0.1 * i), dtype=D) for i in range(len(names))]
    else:
        leaves = [value * (1 + 0.1 * torch.rand(p.shape, dtype=D)) for p in P0.values()]
    return leaves, lambda *ts: dict(zip(names, ts, strict=True))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("rule", "options", "name", "value"), GRADCHECK,
                         ids=lambda x: getattr(x, "__name__", "").split(".")[-1] or None)
def test_gradcheck_hyperparameter(rule, options, name, value, form):
    if rule is alig and name == "max_lr" and form == "per_element":
        value = value * 0.5  # stay clear of the clipping kink for every element
    leaves, build = _form(form, value)
    leaves = [t.requires_grad_(True) for t in leaves]

    def f(*ts):
        return flat(unroll(rule, dict(P0), _set(options, name, build(*ts)))[0])

    assert gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("rule", "options"), [
    (sgd, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    (adam, {"lr": 0.05, "amsgrad": True, "weight_decay": 0.01}),
    (alig, {"max_lr": 0.05, "momentum": 0.9}),
], ids=["sgd", "adam", "alig"])
def test_gradcheck_params_and_state(rule, options):
    # Warm the state up so that every buffer is non-trivial, then differentiate two more
    # steps with respect to the params and every floating state leaf.
    params1, state1 = unroll(rule, dict(P0), options, steps=2)
    params1 = {n: p.detach() for n, p in params1.items()}
    fields = [f for f in state1._fields if isinstance(getattr(state1, f), dict)]
    names = list(params1)
    leaves = [p.clone().requires_grad_(True) for p in params1.values()]
    for f in fields:
        leaves += [t.detach().clone().requires_grad_(True) for t in getattr(state1, f).values()]

    def f(*ts):
        params = dict(zip(names, ts[: len(names)], strict=True))
        rest = list(ts[len(names):])
        bufs = {f: dict(zip(names, rest[i * len(names):(i + 1) * len(names)], strict=True))
                for i, f in enumerate(fields)}
        state = state1._replace(**bufs)
        return flat(unroll(rule, params, options, steps=2, state=state)[0])

    # Adam's d p / d v grows like v^(-3/2) for small v, so the finite-difference side needs
    # a small step to stay accurate.
    assert gradcheck(f, tuple(leaves), eps=1e-8, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rule", [sgd, adam, alig], ids=["sgd", "adam", "alig"])
def test_state_is_a_fixed_tree_of_tensors(rule):
    state0 = rule.init(P0)
    options = {"loss": 1.0} if rule is alig else {"lr": 0.1}
    grads = {n: torch.ones_like(p) for n, p in P0.items()}
    _, state1 = rule.step(P0, grads, state0, **options)
    leaves0, def0 = tree_flatten(state0)
    leaves1, def1 = tree_flatten(state1)
    assert def0 == def1 and all(isinstance(x, torch.Tensor) for x in leaves0 + leaves1)
    for s, n in ((state0, 0), (state1, 1)):
        assert s.step.dtype == torch.int64 and s.step.device.type == "cpu" and int(s.step) == n


def test_safe_sqrt_is_twice_differentiable_at_zero():
    x = torch.tensor([0.0, 4.0], dtype=D, requires_grad=True)
    y = safe_sqrt(x)
    (d1,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    assert y.tolist() == [0.0, 2.0]
    assert d1.tolist() == [0.0, 0.25] and d2.tolist() == [0.0, -1 / 32]


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_hypergradient_is_finite_with_exact_zero_gradients(amsgrad):
    # w[2] never enters the loss, so its gradient is exactly 0 and v stays 0. The
    # hypergradient must be finite and equal to that of the model without w[2].
    target = torch.tensor([1.0, -2.0], dtype=D)

    def inner(w):
        return (w[:2] - target).pow(2).sum()

    def hypergrad(size: int):
        lr = torch.tensor(0.1, dtype=D, requires_grad=True)
        b2 = torch.tensor(0.99, dtype=D, requires_grad=True)
        params = {"w": torch.zeros(size, dtype=D, requires_grad=True)}
        state = adam.init(params)
        for _ in range(4):
            (g,) = torch.autograd.grad(inner(params["w"]), [params["w"]], create_graph=True)
            params, state = adam.step(params, {"w": g}, state, lr=lr, betas=(0.9, b2),
                                      amsgrad=amsgrad)
        outer = (params["w"][:2] - 2 * target).pow(2).sum()
        return torch.autograd.grad(outer, [lr, b2])

    with_zero, without = hypergrad(3), hypergrad(2)
    assert all(torch.isfinite(h) for h in with_zero)
    torch.testing.assert_close(with_zero, without)


def _tensor(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=D, requires_grad=True)


@pytest.mark.parametrize(("rule", "options"), [
    (sgd, {"lr": _tensor(0.1), "momentum": _tensor(0.9), "dampening": 0.1,
           "weight_decay": _tensor(0.01)}),
    (adam, {"lr": _tensor(0.1), "betas": (_tensor(0.9), 0.99), "weight_decay": _tensor(0.1),
            "amsgrad": True}),
    (alig, {"max_lr": _tensor(0.1), "momentum": _tensor(0.9), "loss": _tensor(0.5)}),
], ids=["sgd", "adam", "alig"])
def test_inputs_are_not_modified(rule, options):
    params = {n: p.clone() for n, p in P0.items()}
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    state = rule.init(params)
    state = state._replace(step=state.step + 2)  # past the first-step special case
    tensors = list(params.values()) + list(grads.values())
    tensors += [t for f in state for t in (f.values() if isinstance(f, dict) else [f])]
    tensors += [v for v in options.values() if isinstance(v, torch.Tensor)]
    before = [(t._version, t.detach().clone()) for t in tensors]
    rule.step(params, grads, state, **options)
    for t, (version, value) in zip(tensors, before, strict=True):
        assert t._version == version
        assert torch.equal(t, value)


def _func_unroll(rule, hp_name: str, options: dict[str, Any]):
    """A scalar outer loss as a function of one hyperparameter, with inner grads by
    torch.func.grad (so the whole thing composes with torch.func transforms)."""

    def f(h):
        params, state = dict(P0), rule.init(P0)
        for _ in range(3):
            grads = torch.func.grad(loss_fn)(params)
            extra = {"loss": loss_fn(params)} if rule is alig else {}
            params, state = rule.step(params, grads, state, **_set(options, hp_name, h),
                                      **extra)
        return flat(params).pow(2).sum()

    return f


@pytest.mark.parametrize(("rule", "options", "name"), [
    (sgd, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, "lr"),
    (adam, {"lr": 0.05}, "beta1"),
    (alig, {"max_lr": 0.1, "momentum": 0.9}, "momentum"),
], ids=["sgd", "adam", "alig"])
def test_torch_func_grad_jvp_vmap(rule, options, name):
    f = _func_unroll(rule, name, options)
    h = torch.tensor(0.5, dtype=D, requires_grad=True)
    (expected,) = torch.autograd.grad(f(h), [h])
    torch.testing.assert_close(torch.func.grad(f)(h.detach()), expected)
    _, tangent = torch.func.jvp(f, (h.detach(),), (torch.ones((), dtype=D),))
    torch.testing.assert_close(tangent, expected)
    hs = torch.tensor([0.3, 0.5, 0.7], dtype=D)
    torch.testing.assert_close(torch.func.vmap(f)(hs), torch.stack([f(x) for x in hs]))


def test_validation_errors_name_the_argument():
    g = {n: torch.zeros_like(p) for n, p in P0.items()}
    s = sgd.init(P0)
    with pytest.raises(ConfigError, match="lr must lie"):
        sgd.step(P0, g, s, lr=-0.1)
    with pytest.raises(ConfigError, match="nesterov=True needs momentum"):
        sgd.step(P0, g, s, lr=0.1, nesterov=True)
    with pytest.raises(ConfigError, match="nesterov=True needs dampening"):
        sgd.step(P0, g, s, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ConfigError, match=r"betas\[1\]"):
        adam.step(P0, g, adam.init(P0), lr=0.1, betas=(0.9, 1.0))
    with pytest.raises(ConfigError, match="max_lr must be > 0"):
        alig.step(P0, g, alig.init(P0), loss=1.0, max_lr=0.0)
    with pytest.raises(ConfigError, match="momentum must lie"):
        alig.step(P0, g, alig.init(P0), loss=1.0, momentum=-0.5)
    with pytest.raises(ConfigError, match="missing"):
        sgd.step(P0, {"w": g["w"]}, s, lr=0.1)


def test_resolve_forms_and_errors():
    p = torch.zeros(2, 3)
    assert resolve(0.5, "w", p, what="lr") == 0.5
    t = torch.tensor(0.5)
    assert resolve(t, "w", p, what="lr") is t
    assert resolve({"w": t}, "w", p, what="lr") is t
    with pytest.raises(ConfigError, match=r"no entry for parameter 'b'"):
        resolve({"w": t}, "b", p, what="lr")
    with pytest.raises(ConfigError, match=r"parameter's shape \(2, 3\)"):
        resolve({"w": torch.zeros(3)}, "w", p, what="lr")
