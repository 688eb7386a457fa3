"""Shared pieces of the hypergradient methods: the result type, input checks, and the
translation of autograd failures into errors that say what to do.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from bilevel.errors import HypergradError, NonFiniteError
from bilevel.tree import (
    Tree,
    check_same_structure,
    is_float_tensor,
    tree_flatten,
    tree_map,
    tree_paths,
)

StepFn = Callable[[Tree, Tree, int], Tree]
OuterLossFn = Callable[[Tree, Tree], torch.Tensor]


class HypergradResult(NamedTuple):
    """What every method returns.

    Attributes:
        hypergrad: the total derivative ``dL_V/dλ`` (direct term included), a tree shaped
            like ``hparams``; a hyperparameter the loss does not reach gets zeros.
        state: the final inner state, detached (for implicit: ``state_star``; for
            one-pass and greedy: the state after the step).
        outer_loss: the outer loss value, detached.
        info: method-specific diagnostics (e.g. Neumann term norms, solver residual).
        aux: what a ``has_aux`` step returned beside the state (one-pass), else ``None``.
    """

    hypergrad: Tree
    state: Tree
    outer_loss: torch.Tensor
    info: dict[str, Any]
    aux: Any = None


def hparam_leaves(hparams: Tree) -> list[torch.Tensor]:
    """The leaves of ``hparams``, checked: floating tensors that require grad."""
    leaves = []
    for path, leaf in tree_paths(hparams):
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            raise HypergradError(
                f"hyperparameter {path!r} must be a floating-point tensor, got "
                f"{type(leaf).__name__}{'' if not isinstance(leaf, torch.Tensor) else ' ' + str(leaf.dtype)}."
                " Wrap values with torch.tensor(..., dtype=torch.float32, requires_grad=True)."
            )
        if not leaf.requires_grad:
            raise HypergradError(
                f"hyperparameter {path!r} does not require grad, so no hypergradient can "
                "reach it. Create it with requires_grad=True (or call .requires_grad_())."
            )
        leaves.append(leaf)
    if not leaves:
        raise HypergradError("hparams is empty: pass at least one tensor to differentiate.")
    return leaves


def grads_or_zeros(
    grads: tuple[torch.Tensor | None, ...], like: list[torch.Tensor]
) -> list[torch.Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like, strict=True)]


def versions(tree: Tree) -> list[int]:
    return [x._version if isinstance(x, torch.Tensor) else 0 for x in tree_flatten(tree)[0]]


def checked_first_step(step: StepFn, state: Tree, hparams: Tree, t: int) -> Tree:
    """Call ``step`` once, checking that it neither mutates its inputs nor changes the
    structure of the state. Later steps skip the checks (they cost a little each)."""
    before_s, before_h = versions(state), versions(hparams)
    try:
        new = step(state, hparams, t)
    except RuntimeError as exc:
        if "in-place operation" not in str(exc):
            raise
        raise HypergradError(
            "the step function modified its input in place (an in-place op such as add_, "
            "copy_ or x[...] = ... on a state tensor). Step functions must be pure: return "
            f"new tensors (e.g. p - lr * g) instead. PyTorch said: {str(exc).splitlines()[0]}"
        ) from exc
    for (path, leaf), v in zip(tree_paths(state), before_s, strict=True):
        if isinstance(leaf, torch.Tensor) and leaf._version != v:
            raise HypergradError(
                f"the step function modified its input state in place at {path!r} "
                "(an in-place op such as add_, copy_ or x[...] = ...). Step functions must be "
                "pure: return new tensors (e.g. p - lr * g) instead."
            )
    for (path, leaf), v in zip(tree_paths(hparams), before_h, strict=True):
        if isinstance(leaf, torch.Tensor) and leaf._version != v:
            raise HypergradError(
                f"the step function modified hyperparameter {path!r} in place; step "
                "functions must be pure."
            )
    check_same_structure(
        state, new, what="step(state, hparams, t) returned a state of another structure",
        fix="Return a state with exactly the keys and nesting it received.",
    )
    return new


def prepare_state(state: Tree) -> Tree:
    """Detached copies of the floating leaves that require grad (for implicit methods)."""
    return tree_map(lambda x: x.detach().requires_grad_() if is_float_tensor(x) else x, state)


def float_leaves(tree: Tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if is_float_tensor(x)]


def first_bad_step(flags: list[tuple[int, torch.Tensor]]) -> int | None:
    """The step of the first False ``(step, all_finite)`` flag; one host sync in all."""
    if not flags:
        return None
    ok = torch.stack([f for _, f in flags]).cpu()
    if bool(ok.all()):
        return None
    return flags[int((~ok).nonzero()[0, 0])][0]


def check_finite_result(outer: torch.Tensor, hyper: list[torch.Tensor], where: str) -> None:
    if not bool(torch.isfinite(outer).all()):
        raise NonFiniteError(
            f"{where}: the outer loss is {outer.item()}; lower the learning rates or check "
            "the data.", what="outer loss",
        )
    for i, g in enumerate(hyper):
        if not bool(torch.isfinite(g).all()):
            raise NonFiniteError(
                f"{where}: the hypergradient of hyperparameter leaf #{i} is not finite "
                "although the outer loss is; the inner problem is too unstable to "
                "differentiate (smaller learning rate, fewer steps, or truncate=).",
                what="hypergradient",
            )


_NO_DOUBLE_BACKWARD = re.compile(
    r"differentiate twice|once_differentiable|derivative for (\S+) is not implemented|"
    r"double backward|not implemented for .*backward",
    re.IGNORECASE,
)


@contextlib.contextmanager
def explain_autograd_errors(method: str) -> Iterator[None]:
    """Turn 'no second derivative' failures into a HypergradError that names the op and
    suggests the methods that avoid second derivatives."""
    try:
        yield
    except RuntimeError as exc:
        msg = str(exc)
        if not _NO_DOUBLE_BACKWARD.search(msg):
            raise
        op = re.search(r"derivative for '?([\w.:]+)'? is not implemented", msg)
        name = op.group(1) if op else _op_from_message(msg)
        raise HypergradError(
            f"{method}: the op {name} has no double-backward (second derivative) in PyTorch, "
            "but this hypergradient differentiates through the gradient of the training loss. "
            "Use hypergrad.forward (forward mode, where PyTorch has it for the op), "
            "solver='identity' for implicit methods, or replace the op. "
            f"PyTorch said: {msg.splitlines()[0]}"
        ) from exc


def _op_from_message(msg: str) -> str:
    m = re.search(r"(\w+Backward\w*)", msg)
    return m.group(1) if m else "(unnamed custom autograd.Function)"
