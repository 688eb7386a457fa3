"""Calling ``nn.Module``s as pure functions, and the BatchNorm / buffer policy.

Policy (what every recipe and hypergradient method relies on):

* A model's state is two dicts: ``params`` (trainable tensors) and ``buffers`` (running
  statistics, counters). Both travel in the inner *state*; nothing lives in the module.
* :func:`call` runs the module with ``torch.func.functional_call`` on *clones* of the buffers
  and returns the updated clones. In train mode BatchNorm normalises with the batch's own
  statistics (so gradients flow through them inside unrolls, as in every seed), and the
  running statistics advance in the clones, never in the caller's tensors.
* Buffers carry no gradient: running statistics are not differentiated through.
* In eval mode (``model.eval()``) the running statistics are read, not updated.

This works inside ``torch.func.grad``/``jvp``/``vmap`` because the clones are made inside
the transformed function.

A submodule reached under two names (``m.a = m.b = lin``) is given to ``functional_call`` under
one name per (module, attribute) slot: torch 2.13 restores a slot it was given twice in the
wrong order and leaves the module holding the injected tensors. Weights tied across different
modules (an embedding and a decoder sharing one ``Parameter``) are given under every slot.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]
Buffers = dict[str, torch.Tensor]


def module_state(model: nn.Module) -> tuple[Params, Buffers]:
    """Detached copies of a module's parameters and buffers, keyed by their names."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    return params, buffers


# model -> None (no submodule reached twice), else {name: the other slots holding its tensor}
_SLOTS: weakref.WeakKeyDictionary[nn.Module, dict[str, list[str]] | None] = weakref.WeakKeyDictionary()


def _shared_slots(model: nn.Module) -> dict[str, list[str]] | None:
    """For a model with a submodule reached under two names: each tensor's first name ->
    the names of the other (module, attribute) slots holding that tensor. ``None`` when no
    submodule is shared (the common case: ``functional_call``'s own tie handling is right)."""
    if model in _SLOTS:
        return _SLOTS[model]
    seen: set[tuple[int, str]] = set()
    first: dict[int, str] = {}
    others: dict[str, list[str]] = {}
    shared = False
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for attr, t in (*mod._parameters.items(), *mod._buffers.items()):
            if t is None:
                continue
            if (id(mod), attr) in seen:
                shared = True
                continue
            seen.add((id(mod), attr))
            name = f"{prefix}.{attr}" if prefix else attr
            if id(t) in first:
                others.setdefault(first[id(t)], []).append(name)
            else:
                first[id(t)] = name
                others.setdefault(name, [])
    _SLOTS[model] = others if shared else None
    return _SLOTS[model]


def call(
    model: nn.Module, params: Params, buffers: Buffers, *args: Any, **kwargs: Any
) -> tuple[Any, Buffers]:
    """Run ``model`` with the given tensors; return ``(output, new_buffers)``.

    The caller's ``buffers`` are never modified (see the module docstring).
    """
    # detach: running statistics carry no gradient, even when the state they travel in
    # was prepared with requires_grad by a hypergradient method.
    new_buffers = {k: v.detach().clone() for k, v in buffers.items()}
    slots = _shared_slots(model)
    if slots is None:
        out = functional_call(model, (params, new_buffers), args, kwargs, strict=True)
        return out, new_buffers
    given = {**params, **new_buffers}
    if set(given) != set(slots):
        missing, extra = sorted(set(slots) - set(given)), sorted(set(given) - set(slots))
        raise ValueError(f"functional call of {type(model).__name__}: missing tensors {missing}, "
                         f"unexpected {extra}; pass the names of module_state(model)")
    tensors = {alias: t for name, t in given.items() for alias in (name, *slots[name])}
    out = functional_call(model, tensors, args, kwargs, tie_weights=False, strict=False)
    return out, new_buffers


def load_into(model: nn.Module, params: Params, buffers: Buffers | None = None) -> nn.Module:
    """Copy tensors back into ``model`` in place (for evaluation or saving)."""
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(params[k])
        if buffers is not None:
            for k, b in model.named_buffers():
                b.copy_(buffers[k])
    return model
