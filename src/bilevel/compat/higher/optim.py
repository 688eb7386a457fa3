"""``higher.optim``: differentiable versions of ``torch.optim`` optimisers.

:func:`get_diff_optim` turns an existing ``torch.optim`` instance into its differentiable
twin (same settings, same state); :func:`create_diff_optim` builds one from a type and
keyword arguments; :func:`register_optim` adds a pair for a custom optimiser.
:func:`get_trainable_opt_params` / :func:`apply_trainable_opt_params` move an optimiser's
numeric settings into learnable tensors (an ``override`` dict) and back.

Supported: SGD, Adam, AdamW, Adamax, Adagrad, Adadelta, ASGD, RMSprop, Rprop; each follows
``torch.optim``'s update of torch 2.13 (see the rule modules' docstrings).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from bilevel.compat.higher._base import (
    DifferentiableOptimizer,
    GradCallbackType,
    OverrideType,
)
from bilevel.compat.higher._module import FunctionalModule
from bilevel.compat.higher._rules_adam import (
    DifferentiableAdam,
    DifferentiableAdamax,
    DifferentiableAdamW,
)
from bilevel.compat.higher._rules_adaptive import (
    DifferentiableAdadelta,
    DifferentiableAdagrad,
    DifferentiableRMSprop,
)
from bilevel.compat.higher._rules_sgd import (
    DifferentiableASGD,
    DifferentiableRprop,
    DifferentiableSGD,
)
from bilevel.compat.higher.utils import _is_container, _recursive_map, flatten

_OverrideType = OverrideType  # higher's name, used in annotations
_GradCallbackType = GradCallbackType

_opt_mapping: dict[type, type[DifferentiableOptimizer]] = {
    torch.optim.Adadelta: DifferentiableAdadelta,
    torch.optim.Adagrad: DifferentiableAdagrad,
    torch.optim.Adam: DifferentiableAdam,
    torch.optim.AdamW: DifferentiableAdamW,
    torch.optim.Adamax: DifferentiableAdamax,
    torch.optim.ASGD: DifferentiableASGD,
    torch.optim.RMSprop: DifferentiableRMSprop,
    torch.optim.Rprop: DifferentiableRprop,
    torch.optim.SGD: DifferentiableSGD,
}


def _lookup(opt_type: type) -> type[DifferentiableOptimizer]:
    # the exact type, not a subclass: a subclass may have changed the update
    if opt_type not in _opt_mapping:
        known = ", ".join(sorted(t.__name__ for t in _opt_mapping))
        raise ValueError(
            f"Optimizer type {opt_type.__name__} not supported (supported: {known}). Write a "
            f"DifferentiableOptimizer subclass and call register_optim({opt_type.__name__}, it)."
        )
    return _opt_mapping[opt_type]


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Iterable[Tensor],
    fmodel: FunctionalModule | None = None,
    device: torch.device | None = None,
    override: OverrideType | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """The differentiable twin of ``opt`` (its settings and state copied).

    Args:
        opt: a ``torch.optim`` optimiser of a supported (or registered) type over (some of)
            ``reference_params``.
        reference_params: the parameters of the module ``opt`` trains, as
            ``module.parameters()`` lists them.
        fmodel: the patched module whose fast weights ``step`` updates; without it pass
            ``params=`` to every ``step``.
        device: where to put the copied state.
        override: settings to replace, ``{name: [value]}`` or one value per group.
        track_higher_grads: differentiate through the updates (``False``: detached).
        **kwargs: passed to the optimiser's constructor (e.g. ``grad_callback``).
    """
    return _lookup(type(opt))(
        opt,
        reference_params,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def create_diff_optim(
    opt_type: type[torch.optim.Optimizer],
    opt_kwargs: dict[str, Any] | None = None,
    params: Iterable[Any] | None = None,
    fmodel: FunctionalModule | None = None,
    device: torch.device | None = None,
    override: OverrideType | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """A new differentiable optimiser of ``opt_type`` built with ``opt_kwargs``.

    ``params`` (tensors, or parameter groups as dicts with a ``"params"`` entry) or
    ``fmodel``'s fast weights give the shapes; nothing is read from their values.
    """
    diff_type = _lookup(opt_type)
    if params is not None:
        params = list(params)
        if params and isinstance(params[0], dict):
            dummy: list[Any] = [
                {k: _zeros_like(v) if k == "params" else v for k, v in group.items()}
                for group in params
            ]
            reference = [p for group in dummy for p in group["params"]]
        else:
            dummy = reference = _zeros_like(params)
    elif fmodel is not None:
        dummy = reference = _zeros_like(fmodel.parameters())
    else:
        raise ValueError("Must specify one of fmodel or params in kwargs.")
    opt = opt_type(dummy, **(opt_kwargs or {}))
    return diff_type(
        opt,
        reference,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def _zeros_like(tensors: Iterable[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(t, requires_grad=True) for t in tensors]


def register_optim(
    optim_type: type[torch.optim.Optimizer], diff_optim_type: type[DifferentiableOptimizer]
) -> None:
    """Use ``diff_optim_type`` as the differentiable twin of ``optim_type``."""
    if not (
        isinstance(diff_optim_type, type) and issubclass(diff_optim_type, DifferentiableOptimizer)
    ):
        raise TypeError(
            f"diff_optim_type must be a DifferentiableOptimizer subclass, got {diff_optim_type!r}."
        )
    _opt_mapping[optim_type] = diff_optim_type


def get_trainable_opt_params(
    opt: torch.optim.Optimizer, device: torch.device | None = None
) -> OverrideType:
    """An ``override`` dict of tensors requiring grad, one per numeric group setting.

    Settings made only of ints and floats (``lr``, ``betas``, ...) are included, flags
    (bools) and settings holding anything else (``None``) are not.
    """
    override: OverrideType = collections.defaultdict(list)

    def learnable(x: float | Tensor) -> Tensor:
        if isinstance(x, Tensor):
            return x.detach().clone().requires_grad_()
        return torch.tensor(float(x), device=device, requires_grad=True)

    for group in opt.param_groups:
        for key, value in group.items():
            leaves = flatten(value)
            numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in leaves)
            if key != "params" and leaves and numeric:
                override[key].append(_recursive_map(value, learnable))
    return override


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: OverrideType) -> None:
    """Write learned values of ``override`` back into ``opt``'s groups, keeping their types."""
    for key, values in override.items():
        if len(values) not in (1, len(opt.param_groups)):
            raise ValueError(
                f"override[{key!r}] has {len(values)} values for {len(opt.param_groups)} "
                f"parameter groups; give one value or one per group."
            )
        for gi, group in enumerate(opt.param_groups):
            group[key] = _recursive_apply(values[0] if len(values) == 1 else values[gi], group[key])


def _recursive_apply(replacement: Any, target: Any) -> Any:
    """``replacement``'s values in ``target``'s structure and leaf types."""
    if isinstance(target, Tensor):
        with torch.no_grad():
            target.copy_(torch.as_tensor(replacement))
        return target
    if isinstance(replacement, Tensor) and not _is_container(target):
        return type(target)(replacement.item())
    if isinstance(target, (list, tuple)) and isinstance(replacement, (list, tuple)):
        return type(target)(
            _recursive_apply(r, t) for r, t in zip(replacement, target, strict=True)
        )
    if isinstance(target, dict) and isinstance(replacement, dict):
        return type(target)({k: _recursive_apply(replacement[k], t) for k, t in target.items()})
    raise ValueError(
        f"cannot apply a replacement of type {type(replacement).__name__} to a setting of "
        f"type {type(target).__name__}."
    )


__all__ = [
    "DifferentiableASGD",
    "DifferentiableAdadelta",
    "DifferentiableAdagrad",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdamax",
    "DifferentiableOptimizer",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "DifferentiableSGD",
    "apply_trainable_opt_params",
    "create_diff_optim",
    "get_diff_optim",
    "get_trainable_opt_params",
    "register_optim",
]
