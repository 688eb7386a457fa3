"""The module kit: ordinary modules in, the engine's ``step`` / ``outer_loss`` out,
and the hypergradient back in ``.grad``.

:func:`problem` turns a model, a training loss, an outer loss and a differentiable update
rule from :mod:`bilevel.optim` into the four arguments every method takes, so that
``hypergrad.unrolled(*problem(...), steps=T)`` (or ``forward``, ``implicit``, ``one_pass``,
``greedy``) runs on code written against modules. :func:`write_grad` is the bridge back:
it writes a result's hypergradient into the hyperparameters' ``.grad`` (optionally clipped
by global norm), so any ``torch.optim`` optimiser steps them.

Example (a Commentaries-style teacher weighting a student's per-example losses)::

    def train_loss(student, teacher, x, y):
        return (teacher(x)[:, 0] * F.cross_entropy(student(x), y, reduction="none")).sum()
    val_loss = lambda student, teacher: F.cross_entropy(student(xv), yv)
    r = hypergrad.unrolled(*hypergrad.problem(student, train_loss, val_loss, hparams=teacher,
                                              batches=batches, lr=0.1), steps=20)
    hypergrad.write_grad(r, teacher)
    meta_opt.step()

Conventions:

* **Losses see modules.** ``train_loss(model, hparams, *batch)`` and
  ``outer_loss(model, hparams)`` call the model (and any hyperparameter module) as usual;
  the kit runs them inside :func:`torch.func.functional_call` on the tensors of the current
  inner state, so nothing is monkey-patched and the modules are never modified.
* **Inner gradient.** ``torch.autograd.grad`` (``create_graph`` when something requires
  grad), or ``torch.func.grad`` inside a ``torch.func`` transform such as forward mode's
  ``jacfwd``: the same numbers either way, and every method accepts the step.
* **Inner state** ``{"params", "buffers", "opt"}``: the model's trainable parameters, its
  buffers and the update rule's state. Frozen parameters (``requires_grad=False``) stay
  constants.
* **BatchNorm** follows :mod:`bilevel.functional`: in train mode the model normalises with
  batch statistics and its running statistics advance in ``state["buffers"]``, never in the
  module; in eval mode they are read. Hyperparameter modules' buffers are read, never
  advanced (their running statistics are not part of the inner state).
* **Hyperparameters** may be an ``nn.Module`` (a teacher, a combiner, a generator), a tensor,
  or a dict / list / tuple of them. The engine differentiates with respect to their
  parameters that require grad; the losses receive the same structure with the modules in
  place (and the tensors as the engine passes them).
* **Update-rule hyperparameters** are keywords of ``rule.step`` (``lr=0.1``); a callable
  value is called with the hyperparameters on every step, so it may be learned
  (``lr=lambda h: 10 ** h["log_lr"]``).
* **Batches**: step ``t`` trains on ``batches[t]`` (or ``batches(t)`` for a callable); a
  tuple or list batch is unpacked into the loss's arguments. Without ``batches`` the loss
  receives ``t``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import clip_grad_norm_

from bilevel.functional import call
from bilevel.hypergrad._common import HypergradResult, OuterLossFn, StepFn
from bilevel.optim import sgd
from bilevel.tree import Tree, tree_detach, tree_flatten


class Problem(NamedTuple):
    """The engine's four arguments: ``method(*problem, steps=T)``."""

    step: StepFn
    outer_loss: OuterLossFn
    state: Tree
    hparams: Tree


def problem(
    model: nn.Module,
    train_loss: Callable[..., Any],
    outer_loss: Callable[..., Tensor],
    *,
    hparams: Any = None,
    rule: ModuleType = sgd,
    batches: Sequence[Any] | Callable[[int], Any] | None = None,
    has_aux: bool = False,
    **rule_hparams: Any,
) -> Problem:
    """Build ``(step, outer_loss, state0, hparams)`` from modules (see the module docstring).

    Args:
        model: the inner model; its current tensors are the initial state (copied).
        train_loss: ``train_loss(model, hparams, *batch) -> scalar`` (or ``(scalar, aux)``
            with ``has_aux``); one step of ``rule`` descends it.
        outer_loss: ``outer_loss(model, hparams) -> scalar``, at the trained state.
        hparams: what the hypergradient is taken with respect to: a module, a tensor that
            requires grad, or a dict / list / tuple of them.
        rule: a differentiable update rule with ``init`` / ``step``
            (:mod:`bilevel.optim.sgd`, :mod:`bilevel.optim.adam`, ...).
        batches: the batch of each step: a sequence indexed by ``t`` or a callable of ``t``.
        has_aux: ``train_loss`` returns ``(loss, aux)``; the step then returns
            ``(state, aux)``: pass ``has_aux=True`` to the method as well.
        **rule_hparams: keywords of ``rule.step`` (``lr``, ``momentum``, ...); a callable is
            called with the hyperparameters each step.

    Returns:
        a :class:`Problem`; ``problem.state`` is ``{"params", "buffers", "opt"}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"problem: model must be an nn.Module, got {type(model).__name__}")
    for name in ("init", "step"):
        if not callable(getattr(rule, name, None)):
            raise TypeError(f"problem: rule must be an update rule with init/step such as "
                            f"bilevel.optim.sgd, got {rule!r}")
    bound = _Bound(model, hparams)
    params0 = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    state0 = {"params": params0,
              "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
              "opt": rule.init(params0)}

    def batch_args(t: int) -> tuple[Any, ...]:
        if batches is None:
            return (t,)
        b = batches(t) if callable(batches) else batches[t]
        return tuple(b) if isinstance(b, (tuple, list)) else (b,)

    def step(state: dict[str, Any], h: Tree, t: int) -> Any:
        view = bound.view(h)
        args = batch_args(t)

        def loss(p: dict[str, Tensor]) -> tuple[Tensor, Any]:
            out, bufs = bound(p, state["buffers"], h, train_loss, view, *args)
            return (out[0], (bufs, out[1])) if has_aux else (out, (bufs,))

        grads, (bufs, *aux) = _grad_with_aux(loss, state["params"], h)
        kw = {k: v(view) if callable(v) else v for k, v in rule_hparams.items()}
        params, opt = rule.step(state["params"], grads, state["opt"], **kw)
        new = {"params": params, "buffers": bufs, "opt": opt}
        return (new, aux[0]) if has_aux else new

    def outer(state: dict[str, Any], h: Tree) -> Tensor:
        return bound(state["params"], state["buffers"], h, outer_loss, bound.view(h))[0]

    return Problem(step, outer, state0, bound.hparams)


# torch.func's transform level: None outside every transform. Private, so read defensively:
# without it the kit always takes torch.func.grad, which is correct everywhere, only slower.
_functorch_level = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", None)


def _grad_with_aux(loss: Callable[[dict[str, Tensor]], tuple[Tensor, Any]],
                   params: dict[str, Tensor], h: Tree) -> tuple[dict[str, Tensor], Any]:
    """``∇loss(params)`` and the loss's aux.

    Outside ``torch.func`` transforms through ``torch.autograd.grad``, with ``create_graph``
    when grad mode is on and the parameters or the hyperparameters ``h`` require grad (as
    ``torch.func.grad``'s result would): the same gradient, bit for bit, with less per-operation overhead
    than ``torch.func.grad``, which made unrolls ≈ 10 % slower on small CPU operations
    (docs/results.md). Inside a transform (forward mode's ``jacfwd``), where
    ``torch.autograd.grad`` cannot run, through ``torch.func.grad``.
    """
    if _functorch_level is None or _functorch_level() is not None:
        return torch.func.grad(loss, has_aux=True)(params)
    create = torch.is_grad_enabled() and any(
        isinstance(x, Tensor) and x.requires_grad for x in (*params.values(), *tree_flatten(h)[0]))
    with torch.enable_grad():
        leaves = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
        value, aux = loss(leaves)
        grads = torch.autograd.grad(value, list(leaves.values()), create_graph=create,
                                    materialize_grads=True)
    if not create:  # nothing that leaves the step may hold a graph to the fresh leaves
        aux = tree_detach(aux)
    return dict(zip(leaves, grads, strict=True)), aux


def write_grad(
    result: HypergradResult | Tree, hparams: Any, *, max_norm: float | None = None
) -> Tensor:
    """Write a hypergradient into ``.grad`` of the hyperparameters; return its global norm.

    Args:
        result: a :class:`HypergradResult` (its ``hypergrad`` is used) or a tree of
            gradients shaped like the engine's hyperparameters.
        hparams: what was passed as hyperparameters: a module, tensors, or a dict / list /
            tuple of them (as for :func:`problem`), or the engine's own tensor tree.
        max_norm: clip the global norm to this (``torch.nn.utils.clip_grad_norm_``).

    ``.grad`` is replaced, not accumulated, so no ``zero_grad()`` is needed before; the
    returned norm is the one before clipping.
    """
    grads = result.hypergrad if isinstance(result, HypergradResult) else result
    targets = tree_flatten(engine_tree(hparams))[0]
    values = tree_flatten(grads)[0]
    if len(targets) != len(values):
        raise ValueError(f"write_grad: {len(values)} gradients for {len(targets)} hyperparameter "
                         "tensors; pass the same hparams the hypergradient was taken for")
    for p, g in zip(targets, values, strict=True):
        if p.shape != g.shape:
            raise ValueError(f"write_grad: a gradient of shape {tuple(g.shape)} for a "
                             f"hyperparameter of shape {tuple(p.shape)}")
        p.grad = g.detach().clone()
    if max_norm is not None:
        return clip_grad_norm_(targets, max_norm)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in values]))


def load_state(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Copy a kit state's parameters and buffers (e.g. ``r.state``) into ``model``."""
    with torch.no_grad():
        named = dict(model.named_parameters())
        for k, v in state["params"].items():
            named[k].copy_(v)
        bufs = dict(model.named_buffers())
        for k, v in state["buffers"].items():
            bufs[k].copy_(v)
    return model


def engine_tree(hparams: Any) -> Tree:
    """The engine's hyperparameter tree: each module becomes a dict of its parameters that
    require grad; tensors and containers are kept."""
    if isinstance(hparams, nn.Module):
        return {k: p for k, p in hparams.named_parameters() if p.requires_grad}
    if isinstance(hparams, Mapping):
        return {k: engine_tree(v) for k, v in hparams.items()}
    if isinstance(hparams, (list, tuple)) and not hasattr(hparams, "_fields"):
        return type(hparams)(engine_tree(v) for v in hparams)
    return hparams


class _Host(nn.Module):
    """Holds the model and the hyperparameter modules so that one ``functional_call``
    swaps all their tensors; its forward calls the user's loss."""

    def __init__(self, model: nn.Module, hmods: list[nn.Module]) -> None:
        super().__init__()
        self.model = model
        self.h = nn.ModuleList(hmods)

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


class _Bound:
    """The model and the hyperparameters as one functional callable."""

    def __init__(self, model: nn.Module, hparams: Any) -> None:
        self.hparams = engine_tree(hparams)
        self.user = hparams
        self.hmods: list[nn.Module] = []
        self._collect(hparams)
        self.host = _Host(model, self.hmods)
        self.frozen = {f"model.{k}": v.detach() for k, v in model.named_parameters()
                       if not v.requires_grad}
        for i, m in enumerate(self.hmods):
            self.frozen |= {f"h.{i}.{k}": v.detach() for k, v in m.named_parameters()
                            if not v.requires_grad}
        self.hbufs = {f"h.{i}.{k}": v.detach().clone()
                      for i, m in enumerate(self.hmods) for k, v in m.named_buffers()}

    def _collect(self, x: Any) -> None:
        if isinstance(x, nn.Module):
            self.hmods.append(x)
        elif isinstance(x, Mapping):
            for v in x.values():
                self._collect(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                self._collect(v)

    def view(self, h: Tree) -> Any:
        """The hyperparameters as the losses see them: modules in place, tensors from ``h``."""
        def walk(user: Any, eng: Any) -> Any:
            if isinstance(user, nn.Module):
                return user
            if isinstance(user, Mapping):
                return {k: walk(v, eng[k]) for k, v in user.items()}
            if isinstance(user, (list, tuple)) and not hasattr(user, "_fields"):
                return type(user)(walk(u, e) for u, e in zip(user, eng, strict=True))
            return eng
        return walk(self.user, h)

    def _module_tensors(self, h: Tree) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        it = iter(range(len(self.hmods)))

        def walk(user: Any, eng: Any) -> None:
            if isinstance(user, nn.Module):
                i = next(it)
                out.update({f"h.{i}.{k}": v for k, v in eng.items()})
            elif isinstance(user, Mapping):
                for k, v in user.items():
                    walk(v, eng[k])
            elif isinstance(user, (list, tuple)) and not hasattr(user, "_fields"):
                for u, e in zip(user, eng, strict=True):
                    walk(u, e)
        walk(self.user, h)
        return out

    def __call__(self, params: dict[str, Tensor], buffers: dict[str, Tensor], h: Tree,
                 fn: Callable[..., Any], view: Any, *args: Any) -> tuple[Any, dict[str, Tensor]]:
        """``fn(model, view, *args)`` on these tensors; returns ``(out, new model buffers)``."""
        all_params = {**{f"model.{k}": v for k, v in params.items()}, **self.frozen,
                      **self._module_tensors(h)}
        all_bufs = {**{f"model.{k}": v for k, v in buffers.items()}, **self.hbufs}
        out, new = call(self.host, all_params, all_bufs, fn, view, *args)
        return out, {k[len("model."):]: v for k, v in new.items() if k.startswith("model.")}
