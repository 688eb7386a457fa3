r"""onepass's algorithms: one *hyper-step* of each (seeds.md §3.2), written against the engine.

The inner update is PyTorch's SGD with momentum and coupled weight decay (Clarke et al.'s
``u``), through :func:`bilevel.optim.sgd.step`:

.. math:: d = \nabla L_T(w) + \mathrm{wd}\,w,\qquad b \leftarrow \mu b + d,\qquad
          w \leftarrow w - \eta\, b

(``b`` starts at zero; the gradient is optionally norm-clipped first, as the seed's PTB runs).
Each function below makes ``T = weight_steps`` such updates, in place on :class:`Inner`, and
returns the hypergradient with respect to the learned raw hyperparameters (``None`` when
nothing is learned) and the outer loss:

* ``random`` family: ``T`` plain steps.
* ``ours`` (Clarke et al.): ``T − 1`` plain steps, then :func:`hypergrad.one_pass` on the last
  update with the momentum buffer of the earlier steps as a constant (``has_aux``) and
  ``terms`` Neumann terms; the outer loss is the validation batch at the new weights.
* ``lorraine``: ``T`` plain steps, then :func:`hypergrad.implicit` (Neumann, ``terms`` terms,
  α = 1) at the current weights for the fixed-point map ``Φ = w − η(∇L_T + wd·w)`` of the last
  training batch: Lorraine et al.'s IFT hypergradient with the learning rate absorbed.
* ``baydin``: one step, :func:`hypergrad.greedy` with the *training* loss at the new weights as
  outer loss, differentiated with respect to the natural learning rate; Clarke et al. write
  that derivative directly into the raw ``log10`` learning rate, and so do we.
* ``diff_through_opt``: ``T − lookback`` plain steps, then :func:`hypergrad.unrolled` through
  the last ``lookback`` updates (state = weights and momentum buffers).
* ``ours_initial_code``: *not a correct hypergradient*, offered only to reproduce the paper's
  tables. An earlier commit of the authors' code (rmclarke/
  OptimisingWeightUpdateHyperparameters, dc5e554) differs from the paper's equation, which
  the later one (d4e532b) follows: with ``Δ = w_T − w_{T−1}`` and the last **two** updates differentiable, it
  returns ``∂L_V(w_T)/∂λ + (∂Δ/∂λ)ᵀ p`` with ``p = Σ_{j=0..i} (I − ∂Δ/∂w_{T−1})^j ∂L_V/∂w_{T−1}``,
  where the paper's series has ``(I + ∂Δ/∂w)``, i.e. ``(I − ∂u/∂w)`` for ``u = −Δ``, and
  ``i`` terms. See docs/results.md (the HDLR disagreement) for what it changes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bilevel import hypergrad
from bilevel.errors import HypergradWarning
from bilevel.meta.hparams import Hyperparameters
from bilevel.optim import SGDState, sgd
from bilevel.recipes._onepass_task import Batch, Task
from bilevel.tree import tree_flatten, tree_unflatten

Params = dict[str, Tensor]
_STEP0 = torch.zeros((), dtype=torch.int64)  # dampening is 0, so the step count is unused


@dataclass
class Inner:
    """The inner training state, advanced in place by the hyper-step functions."""

    task: Task
    hp: Hyperparameters
    w: Params
    buf: Params
    grad_clip: float | None = None
    t: int = 0  # weight steps taken
    last_batch: Batch | None = None


def update(inner: Inner, w: Params, buf: Params, hv: dict[str, Any], batch: Batch, *,
           create_graph: bool, commit: bool) -> tuple[Params, Params]:
    """One SGD update ``(w, buf) -> (w', buf')``; differentiable when ``create_graph``."""
    if not create_graph:
        w = {k: v.detach().requires_grad_() for k, v in w.items()}
    loss, aux = inner.task.loss(w, batch)
    grads = dict(zip(w, torch.autograd.grad(loss, list(w.values()), create_graph=create_graph),
                     strict=True))
    if inner.grad_clip is not None:
        norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
        scale = torch.clamp(inner.grad_clip / (norm + 1e-6), max=1.0)
        grads = {k: g * scale for k, g in grads.items()}
    new_w, st = sgd.step(w, grads, SGDState(buf, _STEP0), lr=hv["lr"],
                         momentum=hv["momentum"], weight_decay=hv["weight_decay"])
    if commit:
        inner.task.commit(aux)
    if not create_graph:
        return {k: v.detach() for k, v in new_w.items()}, {k: v.detach() for k, v in st.momentum_buffer.items()}
    return new_w, st.momentum_buffer


def plain_steps(inner: Inner, n: int) -> None:
    """``n`` ordinary weight steps with the current (constant) hyperparameters."""
    hv = inner.hp.values()
    for _ in range(n):
        inner.last_batch = inner.task.train_batch()
        inner.w, inner.buf = update(inner, inner.w, inner.buf, hv, inner.last_batch,
                                    create_graph=False, commit=True)
        inner.t += 1


def _val_loss(inner: Inner) -> Callable[[Params, Any], Tensor]:
    vbatch = inner.task.val_batch()
    return lambda w, raw: inner.task.loss(w, vbatch)[0]


def random(inner: Inner, *, weight_steps: int, **_: Any) -> tuple[None, None]:
    plain_steps(inner, weight_steps)
    return None, None


def ours(inner: Inner, *, weight_steps: int, terms: int, **_: Any) -> tuple[Any, Tensor]:
    plain_steps(inner, weight_steps - 1)
    batch, buf_prev = inner.task.train_batch(), inner.buf  # buf_prev: a constant

    def step(w: Params, raw: Any, t: int) -> tuple[Params, Params]:
        return update(inner, w, buf_prev, inner.hp.values(raw), batch, create_graph=True,
                      commit=True)

    r = hypergrad.one_pass(step, _val_loss(inner), inner.w, inner.hp.raw_tree(), terms=terms,
                           t=inner.t, has_aux=True, on_divergence="identity", check_finite=False)
    inner.w, inner.buf, inner.t = r.state, r.aux, inner.t + 1
    return r.hypergrad, r.outer_loss


def lorraine(inner: Inner, *, weight_steps: int, terms: int, **_: Any) -> tuple[Any, Tensor]:
    plain_steps(inner, weight_steps)
    batch = inner.last_batch
    zero = {k: torch.zeros_like(v) for k, v in inner.w.items()}

    def phi(w: Params, raw: Any, t: int) -> Params:  # w − η(∇L_T + wd·w): no momentum
        hv = {**inner.hp.values(raw), "momentum": torch.zeros((), device=next(iter(w.values())).device)}
        return update(inner, w, zero, hv, batch, create_graph=True, commit=False)[0]

    # Lorraine et al. apply a few Neumann terms at the current weights after each short
    # inner phase, not at a fixed point, by design; silence the engine's convergence warnings.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HypergradWarning)
        r = hypergrad.implicit(phi, _val_loss(inner), inner.w, inner.hp.raw_tree(),
                               solver="neumann", iters=terms - 1, alpha=1.0, t=inner.t,
                               on_divergence="identity", check_finite=False)
    return r.hypergrad, r.outer_loss


def baydin(inner: Inner, *, weight_steps: int, **_: Any) -> tuple[Any, Tensor]:
    plain_steps(inner, weight_steps - 1)
    batch = inner.task.train_batch()
    hv = inner.hp.values()
    lr = hv["lr"].detach().clone().requires_grad_()

    def step(s: dict[str, Params], h: dict[str, Tensor], t: int) -> dict[str, Params]:
        w, buf = update(inner, s["w"], s["buf"], {**hv, "lr": h["lr"]}, batch,
                        create_graph=True, commit=True)
        return {"w": w, "buf": buf}

    def train_loss(s: dict[str, Params], h: Any) -> Tensor:
        return inner.task.loss(s["w"], batch)[0]

    r = hypergrad.greedy(step, train_loss, {"w": inner.w, "buf": inner.buf}, {"lr": lr},
                         t=inner.t, check_finite=False)
    inner.w, inner.buf, inner.t = r.state["w"], r.state["buf"], inner.t + 1
    return r.hypergrad, r.outer_loss


def diff_through_opt(inner: Inner, *, weight_steps: int, lookback: int, **_: Any
                     ) -> tuple[Any, Tensor]:
    plain_steps(inner, weight_steps - lookback)
    t0 = inner.t

    def step(s: dict[str, Params], raw: Any, t: int) -> dict[str, Params]:
        w, buf = update(inner, s["w"], s["buf"], inner.hp.values(raw), inner.task.train_batch(),
                        create_graph=True, commit=True)
        return {"w": w, "buf": buf}

    r = hypergrad.unrolled(step, lambda s, raw: _val_loss(inner)(s["w"], raw),
                           {"w": inner.w, "buf": inner.buf}, inner.hp.raw_tree(), steps=lookback,
                           start=t0, check_finite=False)
    inner.w, inner.buf, inner.t = r.state["w"], r.state["buf"], t0 + lookback
    return r.hypergrad, r.outer_loss


def ours_initial_code(inner: Inner, *, weight_steps: int, terms: int, **_: Any
                      ) -> tuple[Any, Tensor]:
    """The authors' earlier hypergradient (module docstring), sign and all."""
    plain_steps(inner, weight_steps - 2)
    raw = inner.hp.raw_tree()
    (leaves, treedef), hv = tree_flatten(raw), inner.hp.values(raw)
    w_a = {k: v.detach().requires_grad_() for k, v in inner.w.items()}
    w_b, buf_b = update(inner, w_a, inner.buf, hv, inner.task.train_batch(), create_graph=True,
                        commit=True)
    w_c, buf_c = update(inner, w_b, buf_b, hv, inner.task.train_batch(), create_graph=True,
                        commit=True)
    loss = inner.task.loss(w_c, inner.task.val_batch())[0]
    wb = list(w_b.values())
    delta = [c - b for c, b in zip(w_c.values(), wb, strict=True)]
    direct = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
    v = list(torch.autograd.grad(loss, wb, retain_graph=True))
    p = list(v)
    for _ in range(terms):  # the code's range(rollback): terms + 1 terms in all
        jv = torch.autograd.grad(delta, wb, grad_outputs=v, retain_graph=True)
        v = [a - b for a, b in zip(v, jv, strict=True)]  # (I − ∂Δ/∂w)ᵀ v: the flipped sign
        p = [a + b for a, b in zip(p, v, strict=True)]
    indirect = torch.autograd.grad(delta, leaves, grad_outputs=p, allow_unused=True)
    hg = [sum((g for g in (d, i) if g is not None), torch.zeros_like(x)).detach()
          for d, i, x in zip(direct, indirect, leaves, strict=True)]
    inner.w = {k: v.detach() for k, v in w_c.items()}
    inner.buf = {k: v.detach() for k, v in buf_c.items()}
    inner.t += 2
    return tree_unflatten(treedef, hg), loss.detach()


ALGORITHMS: dict[str, Callable[..., tuple[Any, Any]]] = {
    "random": random, "random_stepped_lr": random, "random_validation": random,
    "lorraine": lorraine, "baydin": baydin, "ours": ours, "diff_through_opt": diff_through_opt,
    "ours_initial_code": ours_initial_code,
}
