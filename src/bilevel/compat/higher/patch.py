"""``higher.patch``: stateless versions of modules, on ``torch.func.functional_call``.

:func:`monkeypatch` keeps its historic name, but nothing is monkey-patched: the returned
:class:`~bilevel.compat.higher._module.FunctionalModule` wraps the module and runs it with
fast weights through ``torch.func.functional_call``; the module, its class and its tensors
are left as they were.

Conventions (as in ``higher``):

* ``copy_initial_weights=True``: the initial fast weights are detached copies (leaves), so
  gradients stop there. ``False``: they are ``p.clone()`` of the module's parameters, so
  gradients of an outer loss flow back into ``model.parameters()`` (MAML, or a student
  whose initialisation is meta-learned).
* ``track_higher_grads=False`` ("test mode"): updates are detached and only the latest fast
  weights are kept, so memory stays flat however many steps are taken.
* Buffers (BatchNorm statistics) are copied when patched and advance only in the copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bilevel.compat.higher._fast import FastState
from bilevel.compat.higher._module import FunctionalModule
from bilevel.compat.higher.utils import get_func_params

# ``higher`` annotated patched modules with this private base class; keep the name usable.
_MonkeyPatchBase = FunctionalModule

EncapsulatorType = Callable[[FunctionalModule, nn.Module], None] | None


def _check_module(module: nn.Module) -> None:
    if isinstance(module, FunctionalModule):
        raise ValueError(
            "module is already a patched module; patch the original nn.Module instead."
        )
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}.")


def make_functional(module: nn.Module, encapsulator: EncapsulatorType = None) -> FunctionalModule:
    """A stateless version of ``module`` without fast weights of its own.

    Call it as ``fmodel(x, params=[...])`` with one tensor per ``module.parameters()``
    entry; ``encapsulator(fmodel, module)``, if given, may then set its fast weights.
    """
    _check_module(module)
    fmodule = FunctionalModule(FastState(module, None, track_higher_grads=True))
    if encapsulator is not None:
        encapsulator(fmodule, module)
    return fmodule


def buffer_sync(
    module: nn.Module, fmodule: FunctionalModule, device: torch.device | None = None
) -> None:
    """Copy ``module``'s buffers into ``fmodule`` again (a one-off sync)."""
    fmodule._state.sync_buffers(module, device)


def monkeypatch(
    module: nn.Module,
    device: torch.device | None = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
) -> FunctionalModule:
    """A stateless version of ``module`` holding its own fast weights.

    Args:
        module: the model to run on fast weights; it is not modified.
        device: where to put the fast weights and buffer copies (default: where they are).
        copy_initial_weights: detach the initial fast weights from ``module`` (``True``) or
            keep them differentiable functions of its parameters (``False``).
        track_higher_grads: keep every step's fast weights and their graph (``True``) or
            only the latest, detached (``False``).

    Returns:
        The patched module: ``fmodel(x)``, ``fmodel.parameters(time=t)``, ``fmodel.state_dict()``.
    """
    _check_module(module)
    if not isinstance(track_higher_grads, bool):
        raise ValueError(f"track_higher_grads must be a bool, got {track_higher_grads!r}.")
    if copy_initial_weights:
        params = get_func_params(module, device=device)
    else:
        params = [
            p.clone() if device is None else p.clone().to(device) for p in module.parameters()
        ]
    state = FastState(module, params, track_higher_grads=track_higher_grads, device=device)
    return FunctionalModule(state)


__all__ = ["buffer_sync", "make_functional", "monkeypatch"]
