r"""Differentiable SGD, ASGD and Rprop, following ``torch.optim`` (torch 2.13) step for step.

For a parameter :math:`p` with gradient :math:`g` (negated when ``maximize``):

* **SGD**: :math:`g \leftarrow g + \lambda p`; with momentum :math:`\mu` the buffer is
  :math:`b_1 = g`, :math:`b_t = \mu b_{t-1} + (1-\tau) g`, and the direction is :math:`b_t`
  (or :math:`g + \mu b_t` with Nesterov); :math:`p \leftarrow p - \eta d`.
* **ASGD**: :math:`g \leftarrow g + \lambda p`, :math:`p \leftarrow p(1 - \lambda_d \eta_t)
  - \eta_t g`, the average :math:`a \leftarrow a + \mu_t (p - a)` (or :math:`a = p` while
  :math:`\mu_t = 1`), then :math:`\eta_{t+1} = \eta / (1 + \lambda_d \eta t)^\alpha` and
  :math:`\mu_{t+1} = 1 / \max(1, t - t_0)`. With number settings :math:`\eta_t, \mu_t` are
  rounded to torch's scalar dtype as ``torch.optim`` stores them.
* **Rprop**: the per-entry step size is multiplied by :math:`\eta_+` where :math:`g` kept its
  sign, :math:`\eta_-` where it flipped (and that entry's gradient is zeroed), clamped to
  ``step_sizes``; :math:`p \leftarrow p - \mathrm{sign}(g)\,s`.

A tensor setting always takes its branch (a tensor momentum of 0 still builds the buffer) so
it receives a gradient; values agree with torch except in that corner.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel.compat.higher import _ops
from bilevel.compat.higher._base import DifferentiableOptimizer


class DifferentiableSGD(DifferentiableOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay) as a differentiable map."""

    def _rule(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        momentum, wd = group["momentum"], group["weight_decay"]
        if not _ops.is_off(wd):
            g = g + wd * p
        if not _ops.is_off(momentum):
            buf = state.get("momentum_buffer")
            # torch's first buffer is the gradient itself (no dampening); ours keeps its graph
            buf = g if buf is None else buf * momentum + (1 - group["dampening"]) * g
            state["momentum_buffer"] = buf
            g = g + momentum * buf if group["nesterov"] else buf
        return p - group["lr"] * g


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps scalar state (ASGD's eta and mu) in this dtype
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _stored(value: float) -> float:
    """``value`` rounded as torch.optim stores it in a scalar state tensor."""
    return torch.tensor(value, dtype=_scalar_dtype()).item()


class DifferentiableASGD(DifferentiableOptimizer):
    """``torch.optim.ASGD`` as a differentiable map; ``state["ax"]`` is the running average."""

    def _import_state(self, state: dict[str, Any]) -> dict[str, Any]:
        state = super()._import_state(state)
        for key in ("eta", "mu"):
            state[key] = _ops.as_number(state[key])
        return state

    def _rule(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        lr, lambd, alpha, t0 = group["lr"], group["lambd"], group["alpha"], group["t0"]
        if not state:
            state.update(step=0, eta=_ops.as_number(lr), mu=1.0, ax=torch.zeros_like(p))
        state["step"] += 1
        step = state["step"]
        if not _ops.is_off(group["weight_decay"]):
            g = g + group["weight_decay"] * p
        eta, mu = state["eta"], state["mu"]
        p = p * (1 - lambd * eta) - eta * g
        if isinstance(mu, Tensor) or mu != 1:
            state["ax"] = state["ax"] + (p - state["ax"]) * mu
        else:
            state["ax"] = p
        hyper = (lr, lambd, alpha, t0)
        if any(isinstance(h, Tensor) for h in hyper):
            state["eta"] = lr / ((1 + lambd * lr * step) ** alpha)
            one = torch.ones((), dtype=p.dtype, device=p.device)
            state["mu"] = 1 / torch.maximum(one, step - torch.as_tensor(t0, device=p.device))
        else:
            state["eta"] = _stored(lr / ((1 + lambd * lr * step) ** alpha))
            state["mu"] = _stored(1 / max(1, step - t0))
        return p


class DifferentiableRprop(DifferentiableOptimizer):
    """``torch.optim.Rprop`` as a differentiable map (its updates depend on gradient signs)."""

    def _rule(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        etaminus, etaplus = group["etas"]
        lo, hi = group["step_sizes"]
        lr = group["lr"]
        if not state:
            size = lr * torch.ones_like(g) if isinstance(lr, Tensor) else torch.full_like(g, lr)
            state.update(step=0, prev=torch.zeros_like(p), step_size=size)
        state["step"] += 1
        sign = g.mul(state["prev"]).sign()
        # torch overwrites sign in place (>0 -> eta+, then <0 -> eta-, then 0 -> 1)
        factor = torch.where(sign < 0, etaminus, torch.ones_like(g))
        factor = torch.where(sign > 0, etaplus, factor)
        state["step_size"] = (state["step_size"] * factor).clamp(lo, hi)
        g = torch.where(factor == etaminus, torch.zeros_like(g), g)
        state["prev"] = g
        return p - g.sign() * state["step_size"]
