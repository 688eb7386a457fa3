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
"""

from __future__ import annotations

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


def call(
    model: nn.Module, params: Params, buffers: Buffers, *args: Any, **kwargs: Any
) -> tuple[Any, Buffers]:
    """Run ``model`` with the given tensors; return ``(output, new_buffers)``.

    The caller's ``buffers`` are never modified (see the module docstring).
    """
    # detach: running statistics carry no gradient, even when the state they travel in
    # was prepared with requires_grad by a hypergradient method.
    new_buffers = {k: v.detach().clone() for k, v in buffers.items()}
    out = functional_call(model, (params, new_buffers), args, kwargs, strict=True)
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
