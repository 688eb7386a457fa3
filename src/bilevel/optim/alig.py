r"""Differentiable AliG (Berrada, Zisserman and Kumar, ICML 2020): a clipped Polyak step.

One step size is shared by all parameters. With loss :math:`\ell`, gradients :math:`g`
(over *all* parameters), ``eps`` :math:`\delta`, ``max_lr`` :math:`\eta` and momentum
:math:`\mu`:

.. math::

    \gamma_u = \frac{\ell}{\sum_p \lVert g_p \rVert^2 + \delta}, \qquad
    \gamma = \min(\gamma_u, \eta) \quad (\gamma = \gamma_u \text{ when } \eta
    \text{ is None})

and for every parameter, with a buffer :math:`b` that starts at zero:

.. math::

    \text{no momentum:} \quad & p \leftarrow p - \gamma g \\
    \text{standard (Nesterov-like):} \quad & b \leftarrow \mu b - \gamma g, \quad
        p \leftarrow p - \gamma g + \mu b \\
    \text{adjusted (PyTorch-like):} \quad & b \leftarrow \mu b - g, \quad
        p \leftarrow p - \gamma g + \gamma \mu b

Behaviour at the edges (as in the reference implementation):

* loss 0 gives :math:`\gamma = 0`: no gradient step, but momentum still moves ``p`` by
  :math:`\mu b`;
* a negative loss gives a negative :math:`\gamma`: the step *ascends*. AliG assumes a
  non-negative loss whose infimum is about 0;
* a zero gradient gives :math:`\gamma_u = \ell/\delta`, capped by ``max_lr``; with
  ``max_lr=None`` the step can be huge.

The step is differentiable in everything: params, state, ``loss`` and the gradients
(compute them with ``create_graph=True``), ``max_lr`` and ``momentum``. Pass
``loss.detach()`` and detached grads to treat :math:`\gamma` as a constant, as the
original (non-differentiable) optimiser does.

:class:`bilevel.optim.AliG` is the ``torch.optim.Optimizer`` face of these same functions.

Example:
    >>> import torch
    >>> from bilevel.optim import alig
    >>> params = {"w": torch.tensor([1.0, 2.0])}
    >>> state = alig.init(params)
    >>> grads = {"w": torch.tensor([1.0, 0.0])}
    >>> params, state = alig.step(params, grads, state, loss=torch.tensor(0.5), eps=0.0)
    >>> float(state.step_size), params["w"].tolist()
    (0.5, [0.5, 2.0])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from bilevel.errors import ConfigError
from bilevel.optim._hparams import (
    Grads,
    HParam,
    Params,
    Scalar,
    check_range,
    check_same_keys,
    is_zero,
    new_step,
    next_step,
    resolve,
)

Loss = float | Tensor


class AliGState(NamedTuple):
    """State of :func:`step`; ``step_size*`` are for logging (the rule does not read them)."""

    momentum_buffer: dict[str, Tensor]
    step: Tensor  # 0-d int64 on CPU: the number of steps taken
    step_size: Tensor  # gamma of the last step (mean over parameters if max_lr is a dict)
    step_size_unclipped: Tensor  # gamma_u of the last step


def init(params: Params) -> AliGState:
    """Zero momentum buffers and step sizes (buffers are allocated even without momentum)."""
    first = next(iter(params.values()), torch.zeros(()))
    zero = torch.zeros((), dtype=first.dtype, device=first.device)
    buffers = {name: torch.zeros_like(p) for name, p in params.items()}
    return AliGState(buffers, step=new_step(), step_size=zero, step_size_unclipped=zero)


def unclipped_step_size(loss: Loss, grads: Iterable[Tensor], *, eps: Scalar) -> Tensor:
    r""":math:`\gamma_u = \ell / (\sum \lVert g \rVert^2 + \delta)` over all ``grads`` (0-d)."""
    grads = list(grads)
    if not grads:
        raise ConfigError(
            "AliG found no gradients to compute its step size from. Call loss.backward() "
            "before opt.step(...), or pass grads for at least one parameter."
        )
    sq_norm = torch.stack([(g * g).sum() for g in grads]).sum()  # ()
    if not isinstance(loss, Tensor):
        loss = torch.tensor(float(loss), dtype=sq_norm.dtype, device=sq_norm.device)
    return loss / (sq_norm + eps)


def clip_step_size(gamma: Tensor, max_lr: Scalar | None) -> Tensor:
    """:math:`\\min(\\gamma, \\eta)`; no clipping when ``max_lr`` is None."""
    if max_lr is None:
        return gamma
    if isinstance(max_lr, Tensor):
        return torch.minimum(gamma, max_lr)
    return torch.clamp(gamma, max=max_lr)


def update(
    p: Tensor,
    g: Tensor,
    buf: Tensor | None,
    *,
    step_size: Tensor,
    momentum: Scalar,
    adjusted: bool,
) -> tuple[Tensor, Tensor | None]:
    """One parameter's AliG update; returns ``(new_p, new_buf)`` (``buf`` may be None
    when ``momentum`` is the constant 0, and is then returned unchanged)."""
    new_p = p - step_size * g
    if buf is None or is_zero(momentum):
        return new_p, buf
    if adjusted:
        buf = momentum * buf - g
        return new_p + step_size * momentum * buf, buf
    buf = momentum * buf - step_size * g
    return new_p + momentum * buf, buf


def validate(max_lr: HParam | None, momentum: HParam, eps: Scalar) -> None:
    """Range checks shared by :func:`step` and :class:`~bilevel.optim.AliG`."""
    if max_lr is not None:
        for v in (max_lr.values() if isinstance(max_lr, Mapping) else [max_lr]):
            if not isinstance(v, Tensor) and not float(v) > 0:
                raise ConfigError(
                    f"max_lr must be > 0 (or None for no clipping), got {v}. AliG's step "
                    f"size is min(loss / (|g|^2 + eps), max_lr)."
                )
    check_range(momentum, what="momentum", fix="AliG's momentum is a decay factor in [0, 1).")
    check_range(eps, what="eps")


def step(
    params: Params,
    grads: Grads,
    state: AliGState,
    *,
    loss: Loss,
    max_lr: HParam | None = None,
    momentum: HParam = 0.0,
    eps: Scalar = 1e-5,
    adjusted_momentum: bool = False,
) -> tuple[Params, AliGState]:
    """One AliG step; returns new params and state and never modifies the inputs.

    Args:
        params: parameters by name.
        grads: gradients of ``loss``, same names as ``params``.
        state: from :func:`init` or a previous :func:`step`.
        loss: the current mini-batch loss (should be >= 0; see the module docstring).
        max_lr: the cap on the step size; a float, a 0-d tensor, a per-tensor or
            per-element dict, or None for no cap.
        momentum: :math:`\\mu` in any hyperparameter form.
        eps: :math:`\\delta`, a float or 0-d tensor (it enters the one global step size).
        adjusted_momentum: use the adjusted (PyTorch-like) momentum form.

    Returns:
        ``(new_params, new_state)``; ``new_state.step_size`` and
        ``new_state.step_size_unclipped`` hold :math:`\\gamma` and :math:`\\gamma_u`.

    Raises:
        ConfigError: ``max_lr <= 0``, ``momentum < 0``, ``eps < 0`` or mismatched names.
    """
    validate(max_lr, momentum, eps)
    check_same_keys(params, grads, what="grads")
    check_same_keys(params, state.momentum_buffer, what="state.momentum_buffer")
    gamma_u = unclipped_step_size(loss, grads.values(), eps=eps)
    per_param = isinstance(max_lr, Mapping)
    shared = None if per_param else clip_step_size(gamma_u, max_lr)  # type: ignore[arg-type]
    new_params: Params = {}
    new_buffers: dict[str, Tensor] = {}
    gammas: list[Tensor] = []
    for name, p in params.items():
        gamma = shared
        if gamma is None:
            gamma = clip_step_size(gamma_u, resolve(max_lr, name, p, what="max_lr"))
            gammas.append(gamma.mean())
        mu = resolve(momentum, name, p, what="momentum")
        new_params[name], buf = update(
            p, grads[name], state.momentum_buffer[name],
            step_size=gamma, momentum=mu, adjusted=adjusted_momentum,
        )
        new_buffers[name] = buf if buf is not None else state.momentum_buffer[name]
    summary = shared if shared is not None else torch.stack(gammas).mean()
    new_state = AliGState(new_buffers, next_step(state.step), summary, gamma_u)
    return new_params, new_state
