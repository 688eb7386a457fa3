r"""Differentiable Adagrad, Adadelta and RMSprop, following ``torch.optim`` (torch 2.13).

For a parameter :math:`p` with gradient :math:`g` (negated when ``maximize``), after
:math:`g \leftarrow g + \lambda p` (weight decay), at step :math:`t = 1, 2, \dots`:

* **Adagrad**: :math:`s \leftarrow s + g^2` (``s`` starts at ``initial_accumulator_value``),
  :math:`p \leftarrow p - \frac{\eta}{1 + (t-1)\,\delta}\,\frac{g}{\sqrt{s} + \epsilon}`
  with learning-rate decay :math:`\delta`.
* **Adadelta**: :math:`v \leftarrow \rho v + (1-\rho) g^2`,
  :math:`d = \frac{\sqrt{u + \epsilon}}{\sqrt{v + \epsilon}}\, g`,
  :math:`u \leftarrow \rho u + (1-\rho) d^2`, :math:`p \leftarrow p - \eta d`.
* **RMSprop**: :math:`v \leftarrow \alpha v + (1-\alpha) g^2`; centred:
  :math:`\bar g \leftarrow \mathrm{lerp}(\bar g, g, 1-\alpha)` and the denominator is
  :math:`\sqrt{v - \bar g^2} + \epsilon`, else :math:`\sqrt v + \epsilon`; with momentum
  :math:`\mu`: :math:`b \leftarrow \mu b + g / \mathrm{den}`, :math:`p \leftarrow p - \eta b`,
  else :math:`p \leftarrow p - \eta\, g / \mathrm{den}`.

Square roots that can meet an exact 0 have finite derivatives there (same values).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel.compat.higher import _ops
from bilevel.compat.higher._base import DifferentiableOptimizer


def _decayed(g: Tensor, p: Tensor, group: dict[str, Any]) -> Tensor:
    wd = group["weight_decay"]
    return g if _ops.is_off(wd) else g + wd * p


class DifferentiableAdagrad(DifferentiableOptimizer):
    """``torch.optim.Adagrad`` (learning-rate decay, initial accumulator) as a differentiable map."""

    def _rule(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        if not state:  # torch.optim.Adagrad creates this state in its constructor
            init = group["initial_accumulator_value"]
            total = (
                init * torch.ones_like(p) if isinstance(init, Tensor) else torch.full_like(p, init)
            )
            state.update(step=0, sum=total)
        state["step"] += 1
        g = _decayed(g, p, group)
        clr = group["lr"] / (1 + (state["step"] - 1) * group["lr_decay"])
        state["sum"] = state["sum"] + g * g
        std = _ops.sqrt(state["sum"]) + group["eps"]
        return p - clr * (g / std)


class DifferentiableAdadelta(DifferentiableOptimizer):
    """``torch.optim.Adadelta`` as a differentiable map."""

    def _rule(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        rho, eps = group["rho"], group["eps"]
        if not state:
            state.update(step=0, square_avg=torch.zeros_like(p), acc_delta=torch.zeros_like(p))
        state["step"] += 1
        g = _decayed(g, p, group)
        state["square_avg"] = state["square_avg"] * rho + (1 - rho) * (g * g)
        std = (state["square_avg"] + eps).sqrt()
        delta = (state["acc_delta"] + eps).sqrt().div(std).mul(g)
        state["acc_delta"] = state["acc_delta"] * rho + (1 - rho) * (delta * delta)
        return p - group["lr"] * delta


class DifferentiableRMSprop(DifferentiableOptimizer):
    """``torch.optim.RMSprop`` (centred, momentum) as a differentiable map."""

    def _rule(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        alpha, momentum = group["alpha"], group["momentum"]
        if not state:
            state.update(step=0, square_avg=torch.zeros_like(p))
            if not _ops.is_off(momentum):
                state["momentum_buffer"] = torch.zeros_like(p)
            if group["centered"]:
                state["grad_avg"] = torch.zeros_like(p)
        state["step"] += 1
        g = _decayed(g, p, group)
        state["square_avg"] = square_avg = state["square_avg"] * alpha + (1 - alpha) * (g * g)
        if group["centered"]:
            state["grad_avg"] = grad_avg = _ops.lerp(state["grad_avg"], g, 1 - alpha)
            avg = _ops.sqrt(square_avg - grad_avg * grad_avg)
        else:
            avg = _ops.sqrt(square_avg)
        avg = avg + group["eps"]
        if not _ops.is_off(momentum):
            buf = state.get("momentum_buffer")
            buf = torch.zeros_like(p) if buf is None else buf
            state["momentum_buffer"] = buf = buf * momentum + g / avg
            return p - group["lr"] * buf
        return p - group["lr"] * (g / avg)
