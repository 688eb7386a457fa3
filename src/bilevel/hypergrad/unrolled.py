"""Exact reverse-mode hypergradients through unrolled inner training.

Given a pure step map ``state_{t+1} = step(state_t, hparams, t)`` and an outer loss
``L_V(state_T, hparams)``, :func:`unrolled` returns the total derivative

.. math:: \\frac{dL_V}{d\\lambda} = \\frac{\\partial L_V}{\\partial\\lambda}
          + \\sum_t \\frac{\\partial L_V}{\\partial s_T}
            \\Big(\\prod_{k>t} \\frac{\\partial s_{k+1}}{\\partial s_k}\\Big)
            \\frac{\\partial s_{t+1}}{\\partial \\lambda}

by back-propagating through every step (the method of Commentaries Alg. 1, GTN and
Diff-through-Opt). ``truncate=K`` keeps only the last K terms of the sum (truncated
back-propagation: the first ``steps-K`` steps run without a graph); ``checkpoint=True`` keeps
only segment boundaries and recomputes each segment in the backward pass, so memory grows
like ``sqrt(steps)`` at the price of one extra forward pass. :func:`greedy` is the one-step
case (Baydin et al.'s hypergradient descent when the outer loss is the next training loss).

The step may take its inner gradient with ``torch.func.grad`` (then the same step also runs
in :func:`bilevel.hypergrad.forward`) or with ``torch.autograd.grad(..., create_graph=True)``
(state leaves arrive requiring grad). One PyTorch caveat: inside ``torch.func.grad`` a
custom ``autograd.Function`` whose backward is ``@once_differentiable`` is silently given a
zero second derivative; with ``torch.autograd.grad`` PyTorch raises, and bilevel turns that
into an error naming the op.
"""

from __future__ import annotations

import torch

from bilevel.errors import NonFiniteError
from bilevel.hypergrad._checkpoint import (
    SegmentPlan,
    checkpointed_segment,
    graph_bytes,
    segment_length,
)
from bilevel.hypergrad._common import (
    HypergradResult,
    OuterLossFn,
    StepFn,
    check_finite_result,
    checked_first_step,
    explain_autograd_errors,
    first_bad_step,
    grads_or_zeros,
    hparam_leaves,
    prepare_state,
)
from bilevel.hypergrad._keywords import AuxSteps, step_offset
from bilevel.tree import (
    Tree,
    is_float_tensor,
    tree_all_finite,
    tree_detach,
    tree_flatten,
    tree_unflatten,
)


def unrolled(
    step: StepFn,
    outer_loss: OuterLossFn,
    state0: Tree,
    hparams: Tree,
    *,
    steps: int,
    truncate: int | None = None,
    checkpoint: bool = False,
    segment: int | None = None,
    start: int = 0,
    check_finite: bool = True,
    has_aux: bool = False,
) -> HypergradResult:
    """Hypergradient by back-propagation through ``steps`` inner steps.

    Args:
        step: pure ``step(state, hparams, t) -> state``; must not modify its inputs.
        outer_loss: ``outer_loss(state, hparams) -> scalar tensor``.
        state0: initial inner state (a tree of tensors); it is not modified.
        hparams: tree of floating tensors with ``requires_grad=True``.
        steps: number of inner steps T (t runs from ``start`` to ``start + T - 1``).
        truncate: if set, only the last ``truncate`` steps carry gradient.
        checkpoint: recompute segments in backward (memory ~ sqrt(steps)).
        segment: steps per checkpointed segment. By default it is chosen to minimise peak
            memory from the sizes measured on the first step: ``sqrt(steps · S / G)`` for
            ``S`` the bytes of the state leaves the step changes (a leaf returned unchanged
            is shared between saved states) and ``G`` the bytes one step's graph keeps;
            ``r.info["segment"]`` reports it.
        start: index of the first step (passed to ``step`` as ``t``).
        check_finite: detect NaN/inf in the state after every step (one host sync at the
            end) and in the loss and hypergradient; raise :class:`NonFiniteError` with the
            first bad step.
        has_aux: ``step`` returns ``(new_state, aux)``; ``r.aux`` is the list of each
            step's aux, detached (not differentiated).

    Returns:
        :class:`HypergradResult` with the total derivative, the final state (detached) and
        the outer loss.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if truncate is not None and not truncate >= 1:
        raise ValueError(f"truncate must be >= 1 (steps that carry gradient), got {truncate}")
    h_leaves = hparam_leaves(hparams)
    step = aux_steps = AuxSteps(step, has_aux)
    k = steps if truncate is None else min(truncate, steps)
    flags: list[tuple[int, torch.Tensor]] = []
    # State leaves require grad so that steps written with torch.autograd.grad work too.
    state, t = prepare_state(state0), start

    # Steps outside the truncation window: constant hyperparameters, graph dropped each step.
    h_const = tree_detach(hparams)
    for _ in range(steps - k):
        state = prepare_state(_one_step(step, state, h_const, t, first=t == start))
        if check_finite:
            flags.append((t, tree_all_finite(state)))
        t += 1

    with explain_autograd_errors("unrolled"):
        if checkpoint:
            state, t, segment = _run_checkpointed(step, state, hparams, t, k, segment, flags,
                                                  check_finite, start)
        else:
            for _ in range(k):
                prev, state = state, _one_step(step, state, hparams, t, first=t == start)
                if check_finite:  # leaves passed through unchanged were checked a step ago
                    flags.append((t, tree_all_finite(state, checked=None if t == start else prev)))
                t += 1
        _raise_if_bad(flags)
        loss = outer_loss(state, hparams)
        grads = torch.autograd.grad(loss, h_leaves, allow_unused=True)
    hyper = grads_or_zeros(grads, h_leaves)
    if check_finite:
        check_finite_result(loss.detach(), hyper, "unrolled")
    h_def = tree_flatten(hparams)[1]
    info = {"steps": steps, "carried_gradient": k, "checkpoint": checkpoint}
    if checkpoint:
        info["segment"] = segment
    return HypergradResult(tree_unflatten(h_def, hyper), tree_detach(state), loss.detach(), info,
                           aux_steps.collected(range(start, start + steps)))


def greedy(
    step: StepFn, outer_loss: OuterLossFn, state: Tree, hparams: Tree, *, start: int = 0,
    check_finite: bool = True, has_aux: bool = False, t: int | None = None,
) -> HypergradResult:
    """One-step hypergradient ``d L_V(step(state, λ)) / dλ``.

    With plain SGD and the *next training batch's* loss as ``outer_loss`` this is Baydin
    et al.'s hypergradient descent: ``dL/dlr = -∇L(w_{t+1}) · ∇L(w_t)``. ``start`` is the
    ``t`` passed to ``step`` (``t=`` is its deprecated old name); with ``has_aux`` the step
    returns ``(new_state, aux)`` and ``r.aux`` is that step's aux.
    """
    start = step_offset(start, t, method="greedy")
    r = unrolled(step, outer_loss, state, hparams, steps=1, start=start,
                 check_finite=check_finite, has_aux=has_aux)
    return r._replace(aux=r.aux[0]) if has_aux else r


def _one_step(step: StepFn, state: Tree, hparams: Tree, t: int, *, first: bool) -> Tree:
    return checked_first_step(step, state, hparams, t) if first else step(state, hparams, t)


def _run_checkpointed(
    step: StepFn, state: Tree, hparams: Tree, t: int, k: int, segment: int | None,
    flags: list[tuple[int, torch.Tensor]], check_finite: bool, start: int,
) -> tuple[Tree, int, int]:
    if t == start or segment is None:
        # One step outside the Function, on the real tensors: the structural checks (first
        # step only) and the size of one step's graph, to choose the segment length.
        one = checked_first_step(step, state, hparams, t) if t == start else step(state, hparams, t)
        if segment is None:  # a leaf the step returns unchanged is shared, not saved again
            floats = [x for x, y in zip(tree_flatten(state)[0], tree_flatten(one)[0], strict=True)
                      if is_float_tensor(x) and x is not y]
            segment = segment_length(k, sum(x.numel() * x.element_size() for x in floats),
                                     graph_bytes(tree_flatten(one)[0]))
        del one
    seg = segment
    done, plan = 0, SegmentPlan()
    while done < k:
        n = min(seg, k - done)

        def run(s: Tree, h: Tree, t0: int = t, n: int = n) -> Tree:
            for i in range(n):
                s = step(s, h, t0 + i)
            return s

        state = checkpointed_segment(run, state, hparams, plan)
        if check_finite:
            flags.append((t + n - 1, tree_all_finite(state)))
        t, done = t + n, done + n
    return state, t, seg


def _raise_if_bad(flags: list[tuple[int, torch.Tensor]]) -> None:
    bad = first_bad_step(flags)
    if bad is not None:
        raise NonFiniteError(
            f"the inner state became NaN or infinite at step {bad} (or in the checkpoint "
            f"segment that ends there); lower the inner learning rate or check the data. Nothing was "
            "written back.",
            step=bad, what="state",
        )
