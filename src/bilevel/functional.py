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
from typing import Any, NamedTuple

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


class _Layout(NamedTuple):
    """What :func:`call` needs to know about a model's tensors, found once per model."""

    names: frozenset[str]  # the names of module_state(model): the keys a call must give
    slots: dict[str, list[str]] | None  # a submodule reached twice: name -> its other slots
    tied: bool  # a tensor held by two different modules (tied weights)


_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, _Layout] = weakref.WeakKeyDictionary()


def _layout(model: nn.Module) -> _Layout:
    """The model's :class:`_Layout`, cached (a model whose modules are rearranged after its
    first call is not seen again: build a new model instead)."""
    if model in _LAYOUTS:
        return _LAYOUTS[model]
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
    names = frozenset(k for k, _ in (*model.named_parameters(), *model.named_buffers()))
    layout = _Layout(names, others if shared else None, any(others.values()))
    _LAYOUTS[model] = layout
    return layout


def call(
    model: nn.Module, params: Params, buffers: Buffers, *args: Any, **kwargs: Any
) -> tuple[Any, Buffers]:
    """Run ``model`` with the given tensors; return ``(output, new_buffers)``.

    The caller's ``buffers`` are never modified (see the module docstring).
    """
    # detach: running statistics carry no gradient, even when the state they travel in
    # was prepared with requires_grad by a hypergradient method.
    new_buffers = {k: v.detach().clone() for k, v in buffers.items()}
    layout = _layout(model)
    if layout.slots is None:
        given = params.keys() | new_buffers.keys()
        if given == layout.names and len(given) == len(params) + len(new_buffers):
            # every name given once, checked here: functional_call's own strict and
            # tie checks walk the whole module tree on every call (a third of its cost)
            out = functional_call(model, (params, new_buffers), args, kwargs,
                                  tie_weights=layout.tied, strict=False)
        else:  # let torch name what is missing or unexpected
            out = functional_call(model, (params, new_buffers), args, kwargs, strict=True)
        return out, new_buffers
    slots = layout.slots
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
