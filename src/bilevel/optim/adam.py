r"""Differentiable Adam, AdamW and AMSGrad.

The update follows ``torch.optim.Adam`` (and ``AdamW`` through ``decoupled_weight_decay``)
exactly. With learning rate :math:`\eta`, betas :math:`\beta_1, \beta_2`, weight decay
:math:`\lambda` and step number :math:`t = 1, 2, \dots`:

.. math::

    g &\leftarrow \pm g + \lambda p \quad (\lambda p \text{ only when coupled}) \\
    p &\leftarrow p (1 - \eta\lambda) \quad \text{(decoupled only, before the step)} \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2) g^2 \\
    \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ (AMSGrad) or } v_t \\
    p &\leftarrow p - \frac{\eta}{1 - \beta_1^t}\,
        \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

Conventions:

* Moments start at zero; ``t`` is ``state.step + 1``.
* :math:`\sqrt{\hat v}` is a *safe* square root whose derivatives of every order are finite
  at :math:`\hat v = 0` (see :func:`bilevel.optim._hparams.safe_sqrt`): hypergradients
  through steps whose gradient has exact-zero entries stay finite, unlike ``higher`` and
  TorchOpt, which return NaN there.
* The AMSGrad maximum ``torch.maximum`` splits the gradient evenly on exact ties.

Example:
    >>> import torch
    >>> from bilevel.optim import adam
    >>> params = {"w": torch.zeros(3)}
    >>> state = adam.init(params)
    >>> params, state = adam.step(params, {"w": torch.ones(3)}, state, lr=0.1,
    ...                           weight_decay=0.01, decoupled_weight_decay=True)
    >>> [round(float(x), 4) for x in params["w"]]
    [-0.1, -0.1, -0.1]
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
    safe_sqrt,
)


class AdamState(NamedTuple):
    """State of :func:`step`; every buffer has one tensor per parameter."""

    exp_avg: dict[str, Tensor]  # m_t
    exp_avg_sq: dict[str, Tensor]  # v_t
    max_exp_avg_sq: dict[str, Tensor]  # running max of v_t (AMSGrad; zeros otherwise)
    step: Tensor  # 0-d int64 on CPU: the number of steps taken


def init(params: Params) -> AdamState:
    """Zero moments (the AMSGrad buffer is allocated always, so the tree never changes)."""

    def zeros() -> dict[str, Tensor]:
        return {name: torch.zeros_like(p) for name, p in params.items()}

    return AdamState(exp_avg=zeros(), exp_avg_sq=zeros(), max_exp_avg_sq=zeros(), step=new_step())


def _validate(
    lr: HParam, betas: tuple[HParam, HParam], eps: HParam, weight_decay: HParam
) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ConfigError(f"betas must be a pair (beta1, beta2), got {betas!r}.")
    check_range(lr, what="lr", fix="Use a learning rate >= 0 (maximize=True ascends).")
    check_range(betas[0], what="betas[0]", high=1.0, high_open=True)
    check_range(betas[1], what="betas[1]", high=1.0, high_open=True)
    check_range(eps, what="eps")
    check_range(weight_decay, what="weight_decay")


def step(
    params: Params,
    grads: Grads,
    state: AdamState,
    *,
    lr: HParam,
    betas: tuple[HParam, HParam] = (0.9, 0.999),
    eps: HParam = 1e-8,
    weight_decay: HParam = 0.0,
    amsgrad: bool = False,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> tuple[Params, AdamState]:
    """One Adam/AdamW step; returns new params and state and never modifies the inputs.

    Args:
        params: parameters by name.
        grads: gradients, same names as ``params``.
        state: from :func:`init` or a previous :func:`step`.
        lr, betas, eps, weight_decay: hyperparameters; each (and each beta) may be a float,
            a 0-d tensor, a per-tensor dict or a per-element dict.
        amsgrad: use the running maximum of :math:`v_t`.
        decoupled_weight_decay: AdamW (``torch.optim.AdamW`` = this with ``True``).
        maximize: ascend instead of descend.

    Returns:
        ``(new_params, new_state)``.

    Raises:
        ConfigError: a constant hyperparameter out of range or names that do not match.
    """
    _validate(lr, betas, eps, weight_decay)
    check_same_keys(params, grads, what="grads")
    check_same_keys(params, state.exp_avg, what="state.exp_avg")
    use_wd = not is_zero(weight_decay)
    new_params: Params = {}
    m_new, v_new, vmax_new = {}, {}, {}
    for name, p in params.items():
        g = -grads[name] if maximize else grads[name]
        eta = resolve(lr, name, p, what="lr")
        b1 = resolve(betas[0], name, p, what="betas[0]")
        b2 = resolve(betas[1], name, p, what="betas[1]")
        wd = resolve(weight_decay, name, p, what="weight_decay") if use_wd else 0.0
        if use_wd and decoupled_weight_decay:
            p = p * (1 - eta * wd)
        elif use_wd:
            g = g + wd * p
        m = b1 * state.exp_avg[name] + (1 - b1) * g
        v = b2 * state.exp_avg_sq[name] + (1 - b2) * g * g
        vmax = state.max_exp_avg_sq[name]
        if amsgrad:
            vmax = torch.maximum(vmax, v)
        t = (state.step + 1).to(p.dtype)  # 0-d, on the step counter's device
        bias1, bias2 = 1 - b1**t, 1 - b2**t
        denom = safe_sqrt(vmax if amsgrad else v) / torch.sqrt(bias2) + resolve(
            eps, name, p, what="eps"
        )
        new_params[name] = p - (eta / bias1) * m / denom
        m_new[name], v_new[name], vmax_new[name] = m, v, vmax
    new_state = AdamState(m_new, v_new, vmax_new, step=next_step(state.step))
    return new_params, new_state
