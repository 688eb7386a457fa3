"""Arithmetic shared by the update rules, whose settings are numbers or learnable tensors.

The rules write ``torch.optim``'s formulas in its order of operations, but as plain
out-of-place arithmetic (``p - lr * g`` rather than the fused ``p.add_(g, alpha=-lr)``), so
that a tensor setting receives a gradient and the graph of earlier steps stays valid. On
CPU torch's fused kernels round a multiply-add once, so values agree with ``torch.optim``
to rounding (about 1e-16 relative per step in float64), and bit for bit with a hand-written
``p - lr * grad`` unroll.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel.optim._hparams import safe_sqrt

HP = float | int | Tensor


def is_off(value: Any) -> bool:
    """True when ``value`` is the number 0, so its term can be skipped.

    A tensor is never off, even when it holds 0: a learnable hyperparameter must keep its
    path in the graph to receive a gradient (``torch.optim`` would test its value).
    """
    return not isinstance(value, Tensor) and not value


def lerp(a: Tensor, b: Tensor, weight: HP) -> Tensor:
    """``a + weight * (b - a)`` (torch's ``lerp``, differentiable in a tensor weight)."""
    if isinstance(weight, Tensor):
        weight = weight.to(a.dtype)
    return torch.lerp(a, b, weight)


def sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` with the same values but finite derivatives at 0.

    Second-moment estimates are exactly 0 wherever a gradient entry was always 0 (a dead
    ReLU, an unused row); ``torch.sqrt``'s infinite slope there turns hypergradients into
    NaN. See :func:`bilevel.optim._hparams.safe_sqrt`.
    """
    return safe_sqrt(x)


def root(x: HP) -> HP:
    """``x ** 0.5`` for a number (as torch.optim computes it), ``sqrt`` for a tensor."""
    return x.sqrt() if isinstance(x, Tensor) else x**0.5


def as_number(x: Any) -> Any:
    """A 0-d tensor that needs no gradient as a python number (what torch.optim reads)."""
    if isinstance(x, Tensor) and x.dim() == 0 and not x.requires_grad:
        return x.item()
    return x
