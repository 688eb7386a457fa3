r"""Differentiable SGD with momentum, dampening, Nesterov and (decoupled) weight decay.

The update follows ``torch.optim.SGD`` exactly. For each parameter :math:`p` with gradient
:math:`g`, learning rate :math:`\eta`, momentum :math:`\mu`, dampening :math:`\tau` and weight
decay :math:`\lambda`:

.. math::

    g &\leftarrow \pm g \quad (- \text{ when maximize}) \\
    g &\leftarrow g + \lambda p \quad \text{(coupled weight decay only)} \\
    b_t &\leftarrow \mu b_{t-1} + (1 - \tau [t > 0])\, g \quad (b_{-1} = 0) \\
    d &\leftarrow g + \mu b_t \text{ (Nesterov)} \quad \text{or} \quad d \leftarrow b_t \\
    p &\leftarrow p\,(1 - \eta\lambda)_{\text{decoupled only}} - \eta d

Conventions:

* The buffer starts at zero and the first step is not dampened, which reproduces torch's
  "first buffer = grad" rule while keeping the state a fixed tree of tensors.
* ``momentum`` given as the python constant 0 skips the buffer (it is returned unchanged).
  A *tensor* momentum always runs the momentum path, even when its value is 0, so its
  gradient exists; with a tensor momentum of 0 and non-zero dampening the result then
  differs from torch, which ignores dampening without momentum.
* Decoupled weight decay (``decoupled_weight_decay=True``) is the AdamW form
  :math:`p(1 - \eta\lambda)`, applied before the gradient step; torch's SGD has no such
  option, and the reference is "multiply by :math:`1-\eta\lambda`, then ``SGD(wd=0)``".

Example:
    >>> import torch
    >>> from bilevel.optim import sgd
    >>> params = {"w": torch.ones(2)}
    >>> state = sgd.init(params)
    >>> lr = torch.tensor(0.1, requires_grad=True)
    >>> params, state = sgd.step(params, {"w": torch.ones(2)}, state, lr=lr, momentum=0.9)
    >>> params["w"].sum().backward()  # d(sum w)/d lr = -2
    >>> float(lr.grad)
    -2.0
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from bilevel.errors import ConfigError
from bilevel.optim._hparams import (
    Grads,
    HParam,
    Params,
    check_range,
    check_same_keys,
    is_zero,
    new_step,
    next_step,
    resolve,
)


class SGDState(NamedTuple):
    """State of :func:`step`: one momentum buffer per parameter and a step counter."""

    momentum_buffer: dict[str, Tensor]
    step: Tensor  # 0-d int64 on CPU: the number of steps taken


def init(params: Params) -> SGDState:
    """Zero momentum buffers (allocated even without momentum, so the tree never changes)."""
    buffers = {name: torch.zeros_like(p) for name, p in params.items()}
    return SGDState(momentum_buffer=buffers, step=new_step())


def _validate(
    lr: HParam, momentum: HParam, dampening: HParam, weight_decay: HParam, nesterov: bool
) -> None:
    check_range(lr, what="lr", fix="Use a learning rate >= 0 (maximize=True ascends).")
    check_range(momentum, what="momentum")
    check_range(dampening, what="dampening", high=1.0)
    check_range(weight_decay, what="weight_decay")
    if nesterov and is_zero(momentum):
        raise ConfigError(
            "nesterov=True needs momentum > 0, got momentum=0. Set momentum (e.g. 0.9) or "
            "nesterov=False."
        )
    if nesterov and not is_zero(dampening):
        raise ConfigError(
            f"nesterov=True needs dampening=0, got dampening={dampening}. Set dampening=0 "
            f"or nesterov=False."
        )


def step(
    params: Params,
    grads: Grads,
    state: SGDState,
    *,
    lr: HParam,
    momentum: HParam = 0.0,
    dampening: HParam = 0.0,
    weight_decay: HParam = 0.0,
    nesterov: bool = False,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> tuple[Params, SGDState]:
    """One SGD step; returns new params and state and never modifies the inputs.

    Args:
        params: parameters by name.
        grads: gradients, same names as ``params``.
        state: from :func:`init` or a previous :func:`step`.
        lr, momentum, dampening, weight_decay: hyperparameters in any form of
            :mod:`bilevel.optim._hparams` (float, 0-d tensor, per-tensor or per-element dict).
        nesterov: Nesterov momentum (needs momentum > 0 and dampening = 0).
        decoupled_weight_decay: AdamW-style decay :math:`p(1-\\eta\\lambda)`.
        maximize: ascend instead of descend.

    Returns:
        ``(new_params, new_state)``.

    Raises:
        ConfigError: a constant hyperparameter out of range, Nesterov misconfigured, or
            names that do not match.
    """
    _validate(lr, momentum, dampening, weight_decay, nesterov)
    check_same_keys(params, grads, what="grads")
    check_same_keys(params, state.momentum_buffer, what="state.momentum_buffer")
    use_momentum = not is_zero(momentum)
    use_wd = not is_zero(weight_decay)
    started = state.step > 0 if use_momentum else None  # the first step is not dampened
    new_params: Params = {}
    new_buffers: dict[str, Tensor] = {}
    for name, p in params.items():
        g = -grads[name] if maximize else grads[name]
        eta = resolve(lr, name, p, what="lr")
        wd = resolve(weight_decay, name, p, what="weight_decay") if use_wd else 0.0
        if use_wd and not decoupled_weight_decay:
            g = _add_scaled(g, wd, p)
        buf = state.momentum_buffer[name]
        if use_momentum:
            mu = resolve(momentum, name, p, what="momentum")
            tau = resolve(dampening, name, p, what="dampening")
            buf = mu * buf + (1 - tau * started.to(g.dtype)) * g
            g = g + mu * buf if nesterov else buf
        if use_wd and decoupled_weight_decay:
            p = p * (1 - eta * wd)
        new_params[name] = _add_scaled(p, eta, g, sign=-1)
        new_buffers[name] = buf
    return new_params, SGDState(momentum_buffer=new_buffers, step=next_step(state.step))


def _add_scaled(y: Tensor, a: float | Tensor, x: Tensor, *, sign: int = 1) -> Tensor:
    """``y + sign·a·x``.

    A python-number ``a`` goes in as ``alpha`` of one ``torch.add``, as ``torch.optim.SGD``
    does: one operation forward and one backward instead of a product and a sum (about 2 %
    of an unrolled step on a small MLP, docs/results.md). A tensor ``a`` (a learned rate)
    keeps the product, whose gradient reaches ``a``.
    """
    if isinstance(a, float):
        return torch.add(y, x, alpha=sign * a)
    return y + a * x if sign > 0 else y - a * x
