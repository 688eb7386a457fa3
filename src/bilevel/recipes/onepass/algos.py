r"""onepass's algorithms: one *hyper-step* of each (seeds.md §3.2), written against the engine.

The inner update is PyTorch's SGD with momentum and coupled weight decay (Clarke et al.'s
``u``), through :func:`bilevel.optim.sgd.step`, taken as the module kit's step
(:func:`bilevel.recipes.onepass.inner.kit`):

.. math:: d = \nabla L_T(w) + \mathrm{wd}\,w,\qquad b \leftarrow \mu b + d,\qquad
          w \leftarrow w - \eta\, b

(``b`` starts at zero; the gradient is optionally norm-clipped first, as the seed's PTB runs).
Each function below makes ``T = weight_steps`` such updates, in place on :class:`Inner`, and
returns the hypergradient with respect to the learned raw hyperparameters (``None`` when
nothing is learned) and the outer loss:

* ``random`` family: ``T`` plain steps.
* ``ours`` (Clarke et al.): ``T`` steps of :class:`bilevel.hypergrad.HyperSGD` (the drop-in
  users get), whose one-pass hypergradient of the last update (the momentum buffer of the
  earlier steps a constant, ``terms`` Neumann terms) is taken on the validation batch at the
  new weights.
* ``lorraine``: ``T`` plain steps, then :func:`hypergrad.implicit` (Neumann, ``terms`` terms,
  α = 1) at the current weights for the fixed-point map ``Φ = w − η(∇L_T + wd·w)`` of the last
  training batch: Lorraine et al.'s IFT hypergradient with the learning rate absorbed.
* ``baydin`` (Baydin et al.'s SGD-HD as Clarke et al.'s code computes it): one plain step,
  then the hypergradient ``−⟨∇L_T(w_{t+1}), ∇L_T(w_t)⟩`` of two *raw* consecutive training
  gradients (no momentum, weight decay or clipping in it), written directly into the raw
  ``log10`` learning rate, as the authors do. The gradient at the new weights is taken on the
  same minibatch (the authors draw another training minibatch; in full-batch UCI runs the two
  are the same). The config trains on train+validation, as theirs.
* ``baydin_through_update``: our earlier form: :func:`hypergrad.greedy` with the training loss
  at the new weights, i.e. ``−⟨∇L_T(w_{t+1}), ∂w_{t+1}/∂η⟩`` through the whole update
  (momentum buffer, weight decay, clipping) — the exact one-step derivative, which the
  authors' formula approximates by dropping momentum and weight decay.
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
from typing import Any

import torch
from torch import Tensor

from bilevel import hypergrad
from bilevel.errors import HypergradWarning
from bilevel.functional import Params
from bilevel.recipes.onepass.inner import ClarkeSGD, Inner, kit, plain_steps, train_closure
from bilevel.tree import tree_flatten, tree_unflatten


def random(inner: Inner, *, weight_steps: int, **_: Any) -> tuple[None, None]:
    plain_steps(inner, weight_steps)
    return None, None

def ours(inner: Inner, *, weight_steps: int, terms: int, **_: Any) -> tuple[Any, Tensor]:
    opt = inner.opt
    if opt is None or (opt.hyper_every, opt.terms) != (weight_steps, terms):
        raise ValueError("algorithm 'ours' runs on the Inner's HyperSGD, built with "
                         "hyper_every=weight_steps and terms=terms")
    for _ in range(weight_steps):
        inner.last_batch = batch = inner.task.train_batch()
        opt.step(train_closure(inner, batch))
        inner.t += 1
    vbatch = inner.task.val_batch()
    return opt.hypergradient(lambda: inner.task.loss(inner.w, vbatch)[0])


def lorraine(inner: Inner, *, weight_steps: int, terms: int, **_: Any) -> tuple[Any, Tensor]:
    plain_steps(inner, weight_steps)
    zero = {k: torch.zeros_like(v) for k, v in inner.w.items()}
    no_momentum = torch.zeros((), device=zero[next(iter(zero))].device)
    step, outer_loss = kit(inner, batch=inner.last_batch, commit=False,
                           hv=lambda raw: {**inner.hp.values(raw), "momentum": no_momentum})

    def phi(w: Params, raw: Any, t: int) -> Params:  # w − η(∇L_T + wd·w): no momentum
        return step({"params": w, "buffers": inner.task.buffers, "opt": zero}, raw, t)["params"]

    # Lorraine et al. apply a few Neumann terms at the current weights after each short
    # inner phase, not at a fixed point, by design; silence the engine's convergence warnings.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HypergradWarning)
        r = hypergrad.implicit(phi, lambda w, raw: outer_loss({**inner.kit_state(), "params": w}, raw),
                               inner.w, inner.hp.raw_tree(), solver="neumann", terms=terms,
                               alpha=1.0, start=inner.t, on_divergence="identity",
                               check_finite=False)
    return r.hypergrad, r.outer_loss


def baydin(inner: Inner, *, weight_steps: int, **_: Any) -> tuple[Any, Tensor]:
    plain_steps(inner, weight_steps - 1)
    batch = inner.task.train_batch()
    w = {k: v.detach().requires_grad_() for k, v in inner.w.items()}
    loss, aux = inner.task.loss(w, batch)
    g_old = torch.autograd.grad(loss, list(w.values()))
    with torch.no_grad():  # the rule itself, on the raw gradient that the formula needs too
        new_w, new_buf = ClarkeSGD(inner.grad_clip).step(
            w, dict(zip(w, g_old, strict=True)), inner.buf, hv=inner.hp.values())
    inner.w = {k: v.detach().requires_grad_() for k, v in new_w.items()}
    loss_new = inner.task.loss(inner.w, batch)[0]  # an evaluation: its state is not kept
    g_new = torch.autograd.grad(loss_new, list(inner.w.values()))
    inner.task.commit(aux)  # the step's own state (BatchNorm statistics, LSTM hidden state)
    inner.w = {k: v.detach() for k, v in inner.w.items()}
    inner.buf, inner.t = {k: v.detach() for k, v in new_buf.items()}, inner.t + 1
    h = -sum((a * b).sum() for a, b in zip(g_new, g_old, strict=True))
    raw = inner.hp.raw_tree()
    return {"lr": h.detach().reshape(raw["lr"].shape).to(raw["lr"].dtype)}, loss_new.detach()


def baydin_through_update(inner: Inner, *, weight_steps: int, **_: Any) -> tuple[Any, Tensor]:
    plain_steps(inner, weight_steps - 1)
    batch = inner.task.train_batch()
    hv = inner.hp.values()
    lr = {"lr": hv["lr"].detach().clone().requires_grad_()}
    # by the lr *value*, as Baydin et al.; the outer loss is the training loss of the same batch
    step, train_loss = kit(inner, batch=batch, outer_batch=batch, hparams=lr,
                           hv=lambda h: {**hv, "lr": h["lr"]})
    r = hypergrad.greedy(step, train_loss, inner.kit_state(), lr, start=inner.t, check_finite=False)
    inner.adopt(r.state, 1)
    return r.hypergrad, r.outer_loss


def diff_through_opt(inner: Inner, *, weight_steps: int, lookback: int, **_: Any
                     ) -> tuple[Any, Tensor]:
    plain_steps(inner, weight_steps - lookback)
    step, val_loss = kit(inner)
    r = hypergrad.unrolled(step, val_loss, inner.kit_state(), inner.hp.raw_tree(),
                           steps=lookback, start=inner.t, check_finite=False)
    inner.adopt(r.state, lookback)
    return r.hypergrad, r.outer_loss


def ours_initial_code(inner: Inner, *, weight_steps: int, terms: int, **_: Any
                      ) -> tuple[Any, Tensor]:
    """The authors' earlier hypergradient (module docstring), sign and all."""
    plain_steps(inner, weight_steps - 2)
    raw = inner.hp.raw_tree()
    leaves, treedef = tree_flatten(raw)
    step, val_loss = kit(inner)
    s_a = inner.kit_state()
    s_a = {**s_a, "params": {k: v.detach().requires_grad_() for k, v in s_a["params"].items()}}
    s_b = step(s_a, raw, inner.t)
    s_c = step(s_b, raw, inner.t + 1)
    loss = val_loss(s_c, raw)
    wb = list(s_b["params"].values())
    delta = [c - b for c, b in zip(s_c["params"].values(), wb, strict=True)]
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
    inner.adopt(s_c, 2)
    return tree_unflatten(treedef, hg), loss.detach()


ALGORITHMS: dict[str, Callable[..., tuple[Any, Any]]] = {
    "random": random, "random_stepped_lr": random, "random_validation": random,
    "lorraine": lorraine, "baydin": baydin, "baydin_through_update": baydin_through_update,
    "ours": ours, "diff_through_opt": diff_through_opt,
    "ours_initial_code": ours_initial_code,
}
