"""Differentiable update rules and the AliG ``torch.optim.Optimizer``.

Each rule is a module with a pure pair::

    state = sgd.init(params)
    params, state = sgd.step(params, grads, state, lr=0.1, momentum=0.9)

``params`` and ``grads`` are ``dict[str, Tensor]``; the state is a NamedTuple of tensor
dicts plus a 0-d int64 step counter. Nothing is modified in place, so the rules run under
``torch.func.grad``/``jvp``/``vmap`` and under autograd through many steps, with gradients
flowing into params, state and tensor hyperparameters. Hyperparameters are keyword-only and
may be floats, 0-d tensors, per-tensor dicts or per-element dicts (see docs/optim.md).

Rules: :mod:`~bilevel.optim.sgd` (torch.optim.SGD), :mod:`~bilevel.optim.adam`
(torch.optim.Adam / AdamW / AMSGrad), :mod:`~bilevel.optim.alig` (AliG). Optimizer face:
:class:`AliG`, with :func:`l2_projection` as its regulariser. Learned hyperparameters stored
unconstrained (log10 / sigmoid / softplus; scalar, per tensor, per element):
:mod:`bilevel.optim.hyperparameters`. The optimiser that learns them online is
:class:`bilevel.HyperSGD` (in :mod:`bilevel.hypergrad`, since it computes hypergradients).
"""

from __future__ import annotations

from bilevel.optim import adam, alig, sgd
from bilevel.optim._alig_optimizer import AliG
from bilevel.optim._hparams import Grads, HParam, Params, resolve, safe_sqrt
from bilevel.optim._projection import l2_projection, project_l2_ball
from bilevel.optim.adam import AdamState
from bilevel.optim.alig import AliGState
from bilevel.optim.sgd import SGDState

__all__ = [
    "AdamState",
    "AliG",
    "AliGState",
    "Grads",
    "HParam",
    "Params",
    "SGDState",
    "adam",
    "alig",
    "l2_projection",
    "project_l2_ball",
    "resolve",
    "safe_sqrt",
    "sgd",
]
