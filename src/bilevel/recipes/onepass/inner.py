r"""onepass's inner training state and its weight update, from the module kit.

:class:`Inner` holds the weights, momentum buffers and task that the algorithms of
:mod:`bilevel.recipes.onepass.algos` advance. Every update is Clarke et al.'s ``u``,

.. math:: d = \nabla L_T(w) + \mathrm{wd}\,w,\qquad b \leftarrow \mu b + d,\qquad
          w \leftarrow w - \eta\, b

(the gradient optionally norm-clipped first), as the rule :class:`ClarkeSGD` of the module kit:
:func:`kit` builds the engine's ``step`` / ``outer_loss`` with :func:`bilevel.hypergrad.problem`
over the task's model and :meth:`Task.module_loss`, so the algorithms differentiate the same
update the plain steps take, and BatchNorm buffers travel in the kit's state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bilevel import hypergrad
from bilevel.functional import Params
from bilevel.hypergrad import HyperSGD
from bilevel.hypergrad.hypersgd import sgd_update
from bilevel.optim.hyperparameters import Hyperparameters
from bilevel.recipes.onepass.task import Batch, Task


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

    def kit_state(self) -> dict[str, Params]:
        """The module kit's inner state: weights, the model's buffers, momentum buffers."""
        return {"params": self.w, "buffers": self.task.buffers, "opt": self.buf}

    def adopt(self, state: dict[str, Params], steps: int) -> None:
        """Continue from a kit state reached by ``steps`` real weight steps (detached).

        Not with ``opt``: HyperSGD updates its leaves in place, so they are never replaced."""
        if self.opt is not None:
            raise RuntimeError("Inner.adopt: the weights of algorithm 'ours' belong to its HyperSGD")
        self.w, self.task.buffers, self.buf = (
            {k: v.detach() for k, v in state[part].items()} for part in ("params", "buffers", "opt"))
        self.t += steps


class ClarkeSGD:
    """Clarke et al.'s update (module docstring) as a rule for :func:`hypergrad.problem`:
    the state is the momentum buffers, ``hv`` the ``lr`` / ``weight_decay`` / ``momentum``
    values (:func:`bilevel.hypergrad.hypersgd.sgd_update`)."""

    def __init__(self, grad_clip: float | None) -> None:
        self.grad_clip = grad_clip

    def init(self, params: Params) -> Params:
        return {k: torch.zeros_like(v) for k, v in params.items()}

    def step(self, params: Params, grads: Params, buf: Params, *, hv: dict[str, Any]
             ) -> tuple[Params, Params]:
        return sgd_update(params, grads, buf, hv, grad_clip=self.grad_clip)


def kit(inner: Inner, *, outer_batch: Batch | None = None, batch: Batch | None = None,
        hv: Callable[[Any], dict[str, Any]] | None = None, hparams: Any = None,
        commit: bool = True) -> tuple[Callable[..., Any], Callable[..., Tensor]]:
    """One weight update and a loss as the engine's ``step`` / ``outer_loss``, from the kit.

    :func:`hypergrad.problem` over the task's model and :meth:`Task.module_loss`, with
    :class:`ClarkeSGD`; the state is :meth:`Inner.kit_state`. Each step trains on the next
    training batch (or on ``batch``), recorded as ``inner.last_batch``; with ``commit`` the
    LSTM hidden state it produces is kept, so that the next batch continues from it.
    ``outer_loss`` is the loss of ``outer_batch`` (default: the next validation batch, drawn
    when the outer loss is first taken).
    ``hv`` maps the hyperparameters to values (default ``inner.hp.values``); ``hparams``
    is what they are (default the learned raw leaves).
    """
    task = inner.task
    vbatch = [] if outer_batch is None else [outer_batch]

    def loss_of_outer_batch(model: nn.Module, h: Any) -> Tensor:
        if not vbatch:
            vbatch.append(task.val_batch())
        return task.module_loss(model, h, *vbatch[0])[0]

    def next_batch(t: int) -> Batch:
        inner.last_batch = task.train_batch() if batch is None else batch
        return inner.last_batch

    p = hypergrad.problem(task.model, task.module_loss, loss_of_outer_batch,
                          hparams=inner.hp.raw_tree() if hparams is None else hparams,
                          rule=ClarkeSGD(inner.grad_clip), batches=next_batch, has_aux=True,
                          hv=inner.hp.values if hv is None else hv)

    def step(state: dict[str, Params], h: Any, t: int) -> dict[str, Params]:
        task.model.train()  # losses are always taken with batch statistics
        new, hidden = p.step(state, h, t)
        if commit and task.kind == "language_model":
            task.hidden = hidden
        return new

    def outer_loss(state: dict[str, Params], h: Any) -> Tensor:
        task.model.train()
        return p.outer_loss(state, h)

    return step, outer_loss


def plain_steps(inner: Inner, n: int) -> None:
    """``n`` ordinary weight steps with the current (constant) hyperparameters."""
    step = kit(inner)[0]
    raw, state = inner.hp.raw_tree(), inner.kit_state()
    with torch.no_grad():  # no graph to the hyperparameters; the kit still takes ∇L_T
        for i in range(n):
            state = step(state, raw, inner.t + i)
    inner.adopt(state, n)


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
