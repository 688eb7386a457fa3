"""``innerloop_ctx``: a patched module and its differentiable optimiser for one inner loop.

Typical use (the import is the only change from ``higher``)::

    import bilevel.compat.higher as higher

    with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(loss_fn(fmodel(x), y))      # differentiable update
        meta_loss = loss_fn(fmodel(x_val), y_val)
        meta_loss.backward()                         # reaches model (and any override tensors)
    model.load_state_dict(fmodel.state_dict())       # keep the trained weights if wanted

When the context exits, the patched module drops every intermediate step's fast weights,
keeping ``parameters(time=0)`` and the latest: a loss computed afterwards can still be
back-propagated, ``fmodel.state_dict()`` still works, and nothing else of the loop is kept
alive by ``fmodel``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from bilevel.compat.higher._base import DifferentiableOptimizer, OverrideType
from bilevel.compat.higher._module import FunctionalModule
from bilevel.compat.higher.optim import get_diff_optim
from bilevel.compat.higher.patch import monkeypatch


@contextmanager
def innerloop_ctx(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | None = None,
    copy_initial_weights: bool = True,
    override: OverrideType | None = None,
    track_higher_grads: bool = True,
) -> Iterator[tuple[FunctionalModule, DifferentiableOptimizer]]:
    """Yield ``(fmodel, diffopt)``: ``model`` on fast weights and ``opt``'s differentiable twin.

    Args:
        model: the module trained in the inner loop; it is not modified.
        opt: a ``torch.optim`` optimiser over (some of) ``model.parameters()``; its settings
            and state are copied, the optimiser itself is not used.
        device: where to put fast weights, buffers and optimiser state.
        copy_initial_weights: start from detached copies (``True``) or from differentiable
            clones of ``model``'s parameters (``False``: gradients reach ``model``).
        override: settings to replace by (learnable) tensors, ``{"lr": [t]}`` for every
            group or one value per group.
        track_higher_grads: differentiate through the updates; ``False`` runs the loop
            detached with memory that does not grow with the number of steps.
    """
    fmodel = monkeypatch(
        model,
        device,
        copy_initial_weights=copy_initial_weights,
        track_higher_grads=track_higher_grads,
    )
    diffopt = get_diff_optim(
        opt,
        model.parameters(),
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
    )
    try:
        yield fmodel, diffopt
    finally:
        fmodel._state.release()
