"""Shared pieces of the update rules: type aliases, hyperparameter resolution, checks.

A hyperparameter reaches an update rule in one of four forms:

* a python ``float`` (or ``int``/``bool``): a constant, checked for its valid range;
* a 0-d tensor: one learnable value shared by every parameter;
* a *per-tensor* dict ``{name: 0-d tensor or float}``: one value per parameter tensor;
* a *per-element* dict ``{name: tensor shaped like params[name]}``: one value per entry.

Dicts may mix per-tensor and per-element entries. Tensor values are never range-checked:
reading them would force a host sync and fails inside ``torch.func.vmap``; learned
hyperparameters should be kept in range by their parametrisation (softplus, sigmoid).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from bilevel.errors import ConfigError
from bilevel.functional import Params

Grads = dict[str, Tensor]
Scalar = float | Tensor
HParam = float | Tensor | Mapping[str, float | Tensor]


def resolve(value: HParam, name: str, param: Tensor, *, what: str) -> Scalar:
    """The value of hyperparameter ``what`` for parameter ``name``.

    Returns a python float or a tensor that broadcasts against ``param`` (0-d, or
    ``param``'s shape for a per-element value).

    Raises:
        ConfigError: a dict without ``name``, or a per-element tensor of the wrong shape.
    """
    if isinstance(value, Mapping):
        if name not in value:
            raise ConfigError(
                f"{what}: the per-parameter dict has no entry for parameter {name!r} "
                f"(it has {sorted(value)}). Give one value per parameter name, or pass a "
                f"single float/0-d tensor to share it."
            )
        value = value[name]
    if isinstance(value, Tensor):
        if value.dim() != 0 and value.shape != param.shape:
            raise ConfigError(
                f"{what}[{name!r}]: a per-element value must have the parameter's shape "
                f"{tuple(param.shape)}, got {tuple(value.shape)}. Use a 0-d tensor for one "
                f"value per tensor."
            )
        return value
    return float(value)


def _constants(value: HParam) -> list[float]:
    """The python-number values inside ``value`` (tensor values are skipped)."""
    items = value.values() if isinstance(value, Mapping) else [value]
    return [float(v) for v in items if not isinstance(v, Tensor)]


def check_range(
    value: HParam,
    *,
    what: str,
    low: float = 0.0,
    high: float = math.inf,
    high_open: bool = False,
    fix: str = "",
) -> None:
    """Raise :class:`ConfigError` when a constant in ``value`` lies outside ``[low, high]``.

    ``high_open`` makes the upper bound exclusive (betas must be < 1).
    """
    for v in _constants(value):
        above = v >= high if high_open else v > high
        if math.isnan(v) or v < low or above:
            bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
            raise ConfigError(
                f"{what} must lie in {bound}, got {v}." + (f" {fix}" if fix else "")
            )


def is_zero(value: HParam) -> bool:
    """True when ``value`` is a python constant 0 (so the term can be skipped).

    Tensors are never treated as zero: a learnable hyperparameter that happens to be 0
    must still receive its gradient.
    """
    if isinstance(value, Mapping):
        return all(not isinstance(v, Tensor) and float(v) == 0.0 for v in value.values())
    return not isinstance(value, Tensor) and float(value) == 0.0


def check_same_keys(params: Params, other: Mapping[str, Tensor], *, what: str) -> None:
    """Raise :class:`ConfigError` unless ``other`` has exactly the keys of ``params``."""
    if other.keys() != params.keys():
        missing = sorted(params.keys() - other.keys())
        extra = sorted(other.keys() - params.keys())
        raise ConfigError(
            f"{what} must have the same names as params; missing {missing}, extra {extra}. "
            f"Compute grads for every parameter (use zeros for unused ones) and build the "
            f"state with init(params)."
        )


def next_step(step: Tensor) -> Tensor:
    """The incremented step counter (a 0-d int64 tensor, kept where it was, usually CPU)."""
    return step + 1


def new_step() -> Tensor:
    """A fresh step counter: 0-d int64 on CPU, so reading it never syncs a device."""
    return torch.zeros((), dtype=torch.int64)


def safe_sqrt(x: Tensor) -> Tensor:
    r"""``sqrt(x)`` for ``x >= 0`` whose first and second derivatives are finite at 0.

    ``torch.sqrt`` has derivative :math:`1/(2\sqrt{x}) = \infty` at 0, and autograd turns
    :math:`\infty \cdot 0` into NaN, which poisons hypergradients through Adam whenever a
    gradient entry is exactly zero (the ``higher``/TorchOpt bug). The double ``where``
    evaluates ``sqrt`` only on positive inputs, so the zero branch carries derivative 0
    at every order.
    """
    positive = x > 0
    safe = torch.where(positive, x, torch.ones_like(x))
    return torch.where(positive, torch.sqrt(safe), torch.zeros_like(x))
