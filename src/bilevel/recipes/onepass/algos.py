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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bilevel import hypergrad
from bilevel.errors import HypergradWarning
from bilevel.functional import Params
from bilevel.hypergrad import HyperSGD
from bilevel.hypergrad.hypersgd import sgd_update
from bilevel.optim.hyperparameters import Hyperparameters
from bilevel.recipes.onepass.task import Batch, Task
from bilevel.tree import tree_flatten, tree_unflatten


@dataclass
class Inner:
    """The inner training state, advanced in place by the hyper-step functions.

    With ``opt`` (algorithm ``ours``) the weights ``w`` are the leaves that the
    :class:`HyperSGD` updates in place, and the momentum buffers live in ``opt.buf``.
    """

    task: Task
    hp: Hyperparameters
    w: Params
    buf: Params
    grad_clip: float | None = None
    t: int = 0  # weight steps taken
    last_batch: Batch | None = None
    opt: HyperSGD | None = None

    def set_weights(self, w: Params, buf: Params) -> None:
        """Restore weights and momentum buffers (a checkpoint, or a reset to w0)."""
        if self.opt is None:
            self.w, self.buf = dict(w), dict(buf)
            return
        with torch.no_grad():
            for k, v in self.w.items():
                v.copy_(w[k])
        self.opt.buf = {k: b.clone() for k, b in buf.items()}

    def buffers(self) -> Params:
        return self.opt.buf if self.opt is not None else self.buf


def update(inner: Inner, w: Params, buf: Params, hv: dict[str, Any], batch: Batch, *,
           create_graph: bool, commit: bool) -> tuple[Params, Params]:
    """One SGD update ``(w, buf) -> (w', buf')``; differentiable when ``create_graph``."""
    if not create_graph:
        w = {k: v.detach().requires_grad_() for k, v in w.items()}
    loss, aux = inner.task.loss(w, batch)
    grads = dict(zip(w, torch.autograd.grad(loss, list(w.values()), create_graph=create_graph),
                     strict=True))
    new_w, new_buf = sgd_update(w, grads, buf, hv, grad_clip=inner.grad_clip)
    if commit:
        inner.task.commit(aux)
    if not create_graph:
        return {k: v.detach() for k, v in new_w.items()}, {k: v.detach() for k, v in new_buf.items()}
    return new_w, new_buf


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


def train_closure(inner: Inner, batch: Batch) -> Callable[[], Tensor]:
    """The training loss of ``batch`` at the current weights, committing what it changes.

    Idempotent: every call starts from the buffers of the moment it was made, so HyperSGD
    may re-run it (to differentiate the update) without advancing BatchNorm twice."""
    buffers = inner.task.buffers

    def closure() -> Tensor:
        inner.task.buffers = buffers
        loss, aux = inner.task.loss(inner.w, batch)
        inner.task.commit(aux)
        return loss

    return closure


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
                               solver="neumann", terms=terms, alpha=1.0, start=inner.t,
                               on_divergence="identity", check_finite=False)
    return r.hypergrad, r.outer_loss


def baydin(inner: Inner, *, weight_steps: int, **_: Any) -> tuple[Any, Tensor]:
    plain_steps(inner, weight_steps - 1)
    batch = inner.task.train_batch()
    w = {k: v.detach().requires_grad_() for k, v in inner.w.items()}
    loss, aux = inner.task.loss(w, batch)
    g_old = torch.autograd.grad(loss, list(w.values()))
    with torch.no_grad():
        new_w, new_buf = sgd_update(w, dict(zip(w, g_old, strict=True)), inner.buf,
                                    inner.hp.values(), grad_clip=inner.grad_clip)
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
    lr = hv["lr"].detach().clone().requires_grad_()

    def step(s: dict[str, Params], h: dict[str, Tensor], t: int) -> dict[str, Params]:
        w, buf = update(inner, s["w"], s["buf"], {**hv, "lr": h["lr"]}, batch,
                        create_graph=True, commit=True)
        return {"w": w, "buf": buf}

    def train_loss(s: dict[str, Params], h: Any) -> Tensor:
        return inner.task.loss(s["w"], batch)[0]

    r = hypergrad.greedy(step, train_loss, {"w": inner.w, "buf": inner.buf}, {"lr": lr},
                         start=inner.t, check_finite=False)
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
    "lorraine": lorraine, "baydin": baydin, "baydin_through_update": baydin_through_update,
    "ours": ours, "diff_through_opt": diff_through_opt,
    "ours_initial_code": ours_initial_code,
}
