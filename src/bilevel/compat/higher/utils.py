"""Small helpers of ``higher.utils``: copying parameters and walking nested containers.

The underscored names are kept because code written for ``higher`` (its own tests among it)
calls them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn


def _copy_tensor(t: Tensor, safe_copy: bool, device: torch.device | None = None) -> Tensor:
    """A detached tensor with ``t``'s values and ``requires_grad`` flag.

    ``safe_copy`` clones the storage; without it the copy shares ``t``'s memory.
    """
    out = t.detach().clone() if safe_copy else t.detach()
    if device is not None:
        out = out.to(device)
    return out.requires_grad_(t.requires_grad)


def _is_container(target: Any) -> bool:
    """True for the containers :func:`_recursive_map` walks into."""
    return isinstance(target, (list, tuple, dict, set))


def _recursive_map(target: Any, map_fn: Callable[[Any], Any]) -> Any:
    """``map_fn`` applied to every leaf of nested lists, tuples, dicts and sets.

    Container types are kept (a tuple stays a tuple).
    """
    if isinstance(target, dict):
        return type(target)({k: _recursive_map(v, map_fn) for k, v in target.items()})
    if isinstance(target, (list, tuple, set)):
        return type(target)(_recursive_map(v, map_fn) for v in target)
    return map_fn(target)


def _recursive_copy_and_cast(target: Any, device: torch.device | None) -> Any:
    """A copy of ``target`` whose tensors are detached clones (moved to ``device`` if given)."""
    return _recursive_map(
        target, lambda x: _copy_tensor(x, True, device) if isinstance(x, Tensor) else x
    )


def _find_param_in_list(param: Tensor, tensors: Iterable[Tensor]) -> int | None:
    """The position of ``param`` in ``tensors`` by identity (not by value), or ``None``."""
    for i, p in enumerate(tensors):
        if p is param:
            return i
    return None


def _get_param_mapping(module: nn.Module, seen: list[Tensor], mapping: list[int]) -> list[int]:
    """For every parameter slot of ``module`` (tied slots repeated), its unique index.

    The unique order is ``module.parameters()``'s; ``seen`` collects the unique tensors.
    """
    for _, p in module.named_parameters(remove_duplicate=False):
        index = _find_param_in_list(p, seen)
        if index is None:
            mapping.append(len(seen))
            seen.append(p)
        else:
            mapping.append(index)
    return mapping


def flatten(x: Any) -> list[Any]:
    """The leaves of nested dicts (values), lists, tuples and sets, in order."""
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple, set)):
        return [leaf for item in x for leaf in flatten(item)]
    return [x]


def get_func_params(
    module: nn.Module, device: torch.device | None = None, safe_copy: bool = True
) -> list[Tensor]:
    """Detached copies of ``module.parameters()``, each keeping its ``requires_grad`` flag."""
    return [_copy_tensor(p, safe_copy, device) for p in module.parameters()]


__all__ = ["flatten", "get_func_params"]
