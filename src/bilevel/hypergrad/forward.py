"""Exact forward-mode hypergradients through the inner loop.

Forward mode carries, next to the state, its derivative with respect to every scalar
hyperparameter. No graph is kept from one step to the next, so memory is flat in the number
of steps; the cost grows with the number of scalar hyperparameters, so use it for a few
(learning rate, weight decay, momentum), not for a network of meta-parameters.

Two ways, chosen by how the step takes its inner gradient:

* ``torch.func.grad`` steps: ``torch.func.jacfwd`` over the whole unroll, one batch of
  tangents (one per scalar) pushed together with ``vmap(jvp)``, sharing the primal pass.
* ``torch.autograd.grad(..., create_graph=True)`` steps (which cannot run inside
  ``torch.func`` transforms): dual tensors (``torch.autograd.forward_ad``), one pass per
  scalar; the backward pass inside the step is differentiated in forward mode
  (forward-over-reverse). After every step the primal is detached and made a fresh leaf
  that requires grad, with its tangent carried over, so no graph outlives its step.

Cost per tangent: forward-over-reverse differentiates every matrix product of the forward
and backward passes, about two products per product, so ``n`` scalars cost about ``1 + 2n``
plain steps when the primal is shared (``jacfwd``) and ``3n`` when it is not (dual passes).
"""

from __future__ import annotations

import re

import torch
import torch.autograd.forward_ad as fwAD
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
    prepare_state,
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
    floating-point rounding). Cost per step: about 1 + 1.3–2 plain training steps per scalar
    hyperparameter (see the module docstring); memory independent of ``steps``.
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
    wrapped = AuxSteps(step, has_aux)  # a state-only step; keeps each step's aux
    dual = False  # True for a step that calls torch.autograd.grad
    try:
        with torch.no_grad():  # structural checks once, on real tensors
            checked_first_step(wrapped, s0, primal_h, start)
    except RuntimeError as exc:
        if not _autograd_style(exc):
            raise
        checked_first_step(wrapped, prepare_state(s0), primal_h, start)
        dual = True

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
        if dual:
            jac, (loss, state, flags) = _dual_passes(wrapped, outer_loss, s0, primal_h, start, steps)
            auxes = wrapped.collected(range(start, start + steps)) or []
        else:
            jac, (loss, state, flags, auxes) = jacfwd(run, has_aux=True)(primal_h)
    except NotImplementedError as exc:
        op = re.search(r"forward AD with (\S+)", str(exc))
        raise HypergradError(
            f"forward mode: PyTorch has no forward-mode derivative for "
            f"{op.group(1) if op else 'an op in the step'}. Use hypergrad.unrolled (reverse "
            "mode) or an implicit method, or replace the op."
        ) from exc
    except RuntimeError as exc:
        if _autograd_style(exc) or "backward" in str(exc):
            raise HypergradError(
                "forward mode could not differentiate this step: take the inner gradient with "
                "torch.func.grad, or with torch.autograd.grad(loss, state_leaves, "
                "create_graph=True) on the state leaves as received (they arrive requiring "
                "grad; do not detach them), and do not call .backward(). "
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


def _autograd_style(exc: RuntimeError) -> bool:
    msg = str(exc)
    return any(m in msg for m in ("autograd.grad", "does not require grad", "backward()",
                                  "torch.func transforms", "functorch"))


def _dual_passes(
    step: StepFn, outer_loss: OuterLossFn, s0: Tree, h: Tree, start: int, steps: int
) -> tuple[Tree, tuple[torch.Tensor, Tree, torch.Tensor]]:
    """One forward-mode pass per scalar hyperparameter with dual tensors (see the module
    docstring); returns ``(jacobian tree, (loss, final state, finite flags))``."""
    h_leaves, h_def = tree_flatten(h)
    grads = [torch.zeros_like(x) for x in h_leaves]
    loss = state = flags = None
    for i, leaf in enumerate(h_leaves):
        for j in range(leaf.numel()):
            with fwAD.dual_level():
                tangents = [torch.zeros_like(x) for x in h_leaves]
                tangents[i].view(-1)[j] = 1.0
                hd = tree_unflatten(h_def, [fwAD.make_dual(x, d) for x, d in zip(h_leaves, tangents, strict=True)])
                s, fl = _carry(s0, None), []
                for t in range(start, start + steps):
                    s = _carry(step(s, hd, t), fl)
                out = outer_loss(s, hd)
                tangent = fwAD.unpack_dual(out).tangent
                grads[i].view(-1)[j] = 0.0 if tangent is None else tangent.detach()
                if loss is None:
                    loss, state = fwAD.unpack_dual(out).primal.detach(), _primal(s)
                    flags = torch.stack(fl)
    return tree_unflatten(h_def, grads), (loss, state, flags)


def _carry(state: Tree, flags: list[torch.Tensor] | None) -> Tree:
    """A fresh dual leaf per floating state leaf: the primal detached and requiring grad
    (so that the step's torch.autograd.grad can differentiate it), the tangent carried."""
    leaves, d = tree_flatten(state)
    out = []
    for x in leaves:
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            out.append(x)
            continue
        p, t = fwAD.unpack_dual(x)
        primal = p.detach().requires_grad_()
        out.append(primal if t is None else fwAD.make_dual(primal, t.detach()))
    new = tree_unflatten(d, out)
    if flags is not None:
        flags.append(tree_all_finite(_primal(new)))
    return new


def _primal(state: Tree) -> Tree:
    leaves, d = tree_flatten(state)
    return tree_unflatten(d, [fwAD.unpack_dual(x).primal.detach() if isinstance(x, torch.Tensor) else x
                              for x in leaves])
