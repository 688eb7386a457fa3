r"""Differentiable Adam, AdamW and Adamax, following ``torch.optim`` (torch 2.13) step for step.

For a parameter :math:`p` with gradient :math:`g` (negated when ``maximize``), step
:math:`t = 1, 2, \dots`, learning rate :math:`\eta`, betas :math:`\beta_1, \beta_2`:

* **Adam**: :math:`g \leftarrow g + \lambda p` (or, decoupled as in **AdamW**,
  :math:`p \leftarrow p(1 - \eta\lambda)` first); :math:`m \leftarrow
  \mathrm{lerp}(m, g, 1-\beta_1)`, :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`,
  :math:`\hat v = \max(\hat v, v)` with AMSGrad;
  :math:`p \leftarrow p - \frac{\eta}{1-\beta_1^t}\,\frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t}
  + \epsilon}`.
* **Adamax**: :math:`g \leftarrow g + \lambda p`, :math:`m \leftarrow \mathrm{lerp}(m, g,
  1-\beta_1)`, :math:`u \leftarrow \max(\beta_2 u, |g| + \epsilon)`,
  :math:`p \leftarrow p - \frac{\eta}{1-\beta_1^t}\,\frac{m}{u}`.

The square root has finite derivatives at 0 (same values as ``torch.sqrt``), so
hypergradients stay finite where a gradient entry was always exactly 0; ``higher`` masked
that case with gradient hooks instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel.compat.higher import _ops
from bilevel.compat.higher._base import DifferentiableOptimizer


class DifferentiableAdam(DifferentiableOptimizer):
    """``torch.optim.Adam`` (AMSGrad, coupled or decoupled weight decay) as a differentiable map."""

    decoupled = False  # AdamW's rule, whatever the group says

    def _rule(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        amsgrad = group.get("amsgrad", False)
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        step = state["step"]
        if not _ops.is_off(wd):
            if self.decoupled or group.get("decoupled_weight_decay", False):
                p = p * (1 - lr * wd)
            else:
                g = g + wd * p
        state["exp_avg"] = exp_avg = _ops.lerp(state["exp_avg"], g, 1 - beta1)
        state["exp_avg_sq"] = state["exp_avg_sq"] * beta2 + (1 - beta2) * (g * g)
        second = state["exp_avg_sq"]
        if amsgrad:
            state["max_exp_avg_sq"] = second = torch.maximum(state["max_exp_avg_sq"], second)
        step_size = lr / (1 - beta1**step)
        denom = _ops.sqrt(second) / _ops.root(1 - beta2**step) + eps
        return p - step_size * (exp_avg / denom)


class DifferentiableAdamW(DifferentiableAdam):
    """``torch.optim.AdamW``: Adam with decoupled weight decay :math:`p(1-\\eta\\lambda)`."""

    decoupled = True


class DifferentiableAdamax(DifferentiableOptimizer):
    """``torch.optim.Adamax`` (the infinity-norm Adam) as a differentiable map."""

    def _rule(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_inf=torch.zeros_like(p))
        state["step"] += 1
        if not _ops.is_off(wd):
            g = g + wd * p
        state["exp_avg"] = exp_avg = _ops.lerp(state["exp_avg"], g, 1 - beta1)
        state["exp_inf"] = exp_inf = torch.maximum(state["exp_inf"] * beta2, g.abs() + eps)
        clr = lr / (1 - beta1 ** state["step"])
        return p - clr * (exp_avg / exp_inf)
