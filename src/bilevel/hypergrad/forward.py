"""Exact forward-mode hypergradients (``torch.func.jacfwd`` through the inner loop).

Forward mode carries, next to the state, its derivative with respect to every scalar
hyperparameter (a batch of tangents, one per scalar, pushed with ``vmap(jvp)``). No graph
is stored, so memory is flat in the number of steps; the cost grows with the number of
scalar hyperparameters, so use it for a few (learning rate, weight decay, momentum), not
for a network of meta-parameters.

The step must be written with ``torch.func`` transforms (``torch.func.grad`` for the inner
gradient); ``torch.autograd.grad`` does not run inside forward-mode transforms.
"""

from __future__ import annotations

import re

import torch
from torch.func import jacfwd

from bilevel.errors import HypergradError, NonFiniteError
from bilevel.hypergrad._common import (
    HypergradResult,
    OuterLossFn,
    StepFn,
    check_finite_result,
    checked_first_step,
    first_bad_step,
    hparam_leaves,
)
from bilevel.hypergrad._keywords import AuxSteps
from bilevel.tree import Tree, tree_all_finite, tree_detach, tree_flatten, tree_unflatten

MAX_SCALARS = 4096


def forward(
    step: StepFn,
    outer_loss: OuterLossFn,
    state0: Tree,
    hparams: Tree,
    *,
    steps: int,
    start: int = 0,
    check_finite: bool = True,
    has_aux: bool = False,
) -> HypergradResult:
    """Total derivative ``dL_V/dλ`` through ``steps`` inner steps, in forward mode.

    Same contract and result as :func:`bilevel.hypergrad.unrolled` (exactly equal up to
    floating-point rounding). Cost: about (1 + number of scalar hyperparameters / the
    width vmap batches at once) forward passes per step; memory independent of ``steps``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    leaves = hparam_leaves(hparams)
    n = sum(x.numel() for x in leaves)
    if n > MAX_SCALARS:
        raise HypergradError(
            f"forward mode pushes one tangent per scalar hyperparameter; these hparams have "
            f"{n} scalars (limit {MAX_SCALARS}). Use hypergrad.unrolled(..., checkpoint=True) "
            "for many hyperparameters."
        )
    h_def = tree_flatten(hparams)[1]
    primal_h = tree_unflatten(h_def, [x.detach() for x in leaves])
    s0 = tree_detach(state0)
    with torch.no_grad():  # structural checks once, on real tensors
        checked_first_step(AuxSteps(step, has_aux), s0, primal_h, start)

    def run(h: Tree) -> tuple[torch.Tensor, tuple[torch.Tensor, Tree, torch.Tensor, list]]:
        state, flags, auxes = s0, [], []
        for t in range(start, start + steps):
            state = step(state, h, t)
            if has_aux:  # returned through jacfwd's aux, which unwraps the tangents
                state, aux = state
                auxes.append(aux)
            flags.append(tree_all_finite(state))
        loss = outer_loss(state, h)
        return loss, (loss, state, torch.stack(flags), auxes)

    try:
        jac, (loss, state, flags, auxes) = jacfwd(run, has_aux=True)(primal_h)
    except NotImplementedError as exc:
        op = re.search(r"forward AD with (\S+)", str(exc))
        raise HypergradError(
            f"forward mode: PyTorch has no forward-mode derivative for "
            f"{op.group(1) if op else 'an op in the step'}. Use hypergrad.unrolled (reverse "
            "mode) or an implicit method, or replace the op."
        ) from exc
    except RuntimeError as exc:
        if "autograd.grad" in str(exc) or "does not require grad" in str(exc):
            raise HypergradError(
                "forward mode needs a step written with torch.func transforms: compute the "
                "inner gradient with torch.func.grad, not torch.autograd.grad/backward. "
                f"PyTorch said: {str(exc).splitlines()[0]}"
            ) from exc
        raise
    if check_finite:
        bad = first_bad_step(list(enumerate(flags.unbind(0), start)))
        if bad is not None:
            raise NonFiniteError(
                f"the inner state became NaN or infinite at step {bad}; nothing was "
                "written back.", step=bad, what="state",
            )
        check_finite_result(loss, tree_flatten(jac)[0], "forward")
    info = {"steps": steps, "tangents": n}
    return HypergradResult(jac, tree_detach(state), loss.detach(), info,
                           [tree_detach(a) for a in auxes] if has_aux else None)
