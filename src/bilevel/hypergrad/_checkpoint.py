"""Recompute-in-backward for segments of inner steps.

``torch.utils.checkpoint`` does not fit here: its non-reentrant mode refuses
``torch.func.grad`` inside the checkpointed region (saved-tensor hooks), and its reentrant
mode marks every output differentiable, which breaks BatchNorm running statistics carried
in the state. This Function keeps only the segment's input state; in backward it re-runs
the segment (same RNG state) and back-propagates through it with ``torch.autograd.grad``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from bilevel.tree import TreeDef, tree_flatten, tree_unflatten


def _devices(tensors: list[torch.Tensor]) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.is_cuda})


class _Segment(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, run: Any, n_state: int, s_def: TreeDef, h_def: TreeDef, plan: SegmentPlan,
        *flat: Any,
    ):
        cuda = _devices([x for x in flat if isinstance(x, torch.Tensor)])
        ctx.rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda], cuda)
        ctx.run, ctx.n_state, ctx.s_def, ctx.h_def = run, n_state, s_def, h_def
        ctx.requires = [isinstance(x, torch.Tensor) and x.requires_grad for x in flat]
        outs = _forward(plan, run, n_state, s_def, h_def, _detached(flat, ctx.requires))
        mask = plan.mask
        ctx.save_for_backward(*[x.detach() if isinstance(x, torch.Tensor) else None for x in flat])
        ctx.out_diff = list(mask)
        results = tuple(o.detach() for o in outs)
        ctx.mark_non_differentiable(*[r for r, d in zip(results, ctx.out_diff, strict=True) if not d])
        return results

    @staticmethod
    def backward(ctx: Any, *grad_outs: torch.Tensor | None):
        flat = list(ctx.saved_tensors)
        cpu_state, cuda_states, cuda = ctx.rng
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            torch.set_rng_state(cpu_state)
            for d, s in zip(cuda, cuda_states, strict=True):
                torch.cuda.set_rng_state(s, d)
            inputs = _detached(flat, ctx.requires)
            outs = _call(ctx.run, ctx.n_state, ctx.s_def, ctx.h_def, inputs)
            pairs = [
                (o, g) for o, g, d in zip(outs, grad_outs, ctx.out_diff, strict=True)
                if d and g is not None
            ]
            wrt = [x for x, r in zip(inputs, ctx.requires, strict=True) if r]
            grads = iter(
                torch.autograd.grad(
                    [o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True
                )
                if pairs and wrt else [None] * len(wrt)
            )
        return (None, None, None, None, None, *[next(grads) if r else None for r in ctx.requires])


@dataclass
class SegmentPlan:
    """What one unroll learns on its first segment and reuses for the others.

    Which outputs are differentiable is found by running the first segment with grad
    enabled (the graph is dropped on return). Later segments run under ``no_grad``, which
    is markedly cheaper, unless the step needs a graph even then (a step that calls
    ``torch.autograd.grad``): that is learned on the second segment and remembered.
    """

    mask: list[bool] = field(default_factory=list)
    no_grad_ok: bool | None = None


def _forward(plan: SegmentPlan, run: Any, n_state: int, s_def: TreeDef, h_def: TreeDef,
             inputs: list[Any]) -> list[Any]:
    if not plan.mask:
        with torch.enable_grad():
            outs = _call(run, n_state, s_def, h_def, inputs)
        plan.mask.extend(o.requires_grad for o in outs)
        return outs
    if plan.no_grad_ok is not False:
        try:
            with torch.no_grad():
                outs = _call(run, n_state, s_def, h_def, inputs)
            plan.no_grad_ok = True
            return outs
        except RuntimeError:
            if plan.no_grad_ok:  # it worked before: a real error
                raise
            plan.no_grad_ok = False
    with torch.enable_grad():
        return _call(run, n_state, s_def, h_def, inputs)


def _detached(flat: Any, requires: list[bool]) -> list[Any]:
    return [
        x.detach().requires_grad_(r) if isinstance(x, torch.Tensor) else x
        for x, r in zip(flat, requires, strict=True)
    ]


def _call(run: Any, n_state: int, s_def: TreeDef, h_def: TreeDef, flat: list[Any]) -> list[Any]:
    state = tree_unflatten(s_def, list(flat[:n_state]))
    hparams = tree_unflatten(h_def, list(flat[n_state:]))
    return tree_flatten(run(state, hparams))[0]


def checkpointed_segment(run: Any, state: Any, hparams: Any, plan: SegmentPlan) -> Any:
    """``run(state, hparams) -> state`` with only ``state`` kept for backward.

    ``plan`` is shared by the segments of one unroll (see :class:`SegmentPlan`).
    """
    s_leaves, s_def = tree_flatten(state)
    h_leaves, h_def = tree_flatten(hparams)
    for x in s_leaves:
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                "checkpoint=True needs every state leaf to be a tensor; got "
                f"{type(x).__name__}. Store counters as 0-d tensors."
            )
    outs = _Segment.apply(run, len(s_leaves), s_def, h_def, plan, *s_leaves, *h_leaves)
    return tree_unflatten(s_def, list(outs))


def graph_bytes(outputs: list[Any]) -> int:
    """Bytes the autograd graph behind ``outputs`` keeps alive (its saved tensors, each
    counted once), walking back to the leaves. Used once per unroll to size segments."""
    seen_nodes, seen, total = set(), set(), 0
    stack = [o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # freed or not a tensor
                continue
            for x in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(x, torch.Tensor) and x.layout == torch.strided:
                    key = (x.data_ptr(), x.numel(), x.dtype)
                    if key not in seen:
                        seen.add(key)
                        total += x.numel() * x.element_size()
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return total


def segment_length(steps: int, state_bytes: int, step_bytes: int) -> int:
    """Steps per segment that minimise peak memory: ``steps/k`` saved states of
    ``state_bytes`` plus one recomputed segment of ``k`` steps of ``step_bytes`` each is
    smallest at ``k = sqrt(steps · state_bytes / step_bytes)`` (``sqrt(steps)`` when a step
    keeps about a state's worth, fewer when its activations dominate, as in a CNN)."""
    if step_bytes <= 0:
        return max(1, math.ceil(math.sqrt(steps)))
    return max(1, min(steps, round(math.sqrt(steps * state_bytes / step_bytes))))
