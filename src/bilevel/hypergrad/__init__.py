"""How the hypergradient is computed: one contract, several methods.

Every method takes a pure step map ``step(state, hparams, t) -> state``, an outer loss
``outer_loss(state, hparams) -> scalar`` and returns a :class:`HypergradResult` whose
``hypergrad`` is the *total* derivative ``dL_V/dλ`` shaped like ``hparams``.

=====================  =============================================================
``unrolled``           reverse mode through T steps (``truncate=K``, ``checkpoint=True``)
``forward``            forward mode (jacfwd) through T steps; flat memory, few scalars
``implicit``           fixed-point IFT: ``neumann`` / ``cg`` / ``minres`` / ``identity`` / ``exact``
``one_pass``           Clarke et al.'s online implicit hypergradient of the last update
``greedy``             one-step unrolled (Baydin et al.'s hypergradient descent)
``reversible``         exact reverse mode through T SGD-momentum steps by reversal; flat memory
=====================  =============================================================

:func:`from_config` turns a recipe's config section (:mod:`bilevel.run.methods`) into one of
these calls. The module kit (:mod:`bilevel.hypergrad.kit`) builds ``step`` / ``outer_loss`` from
modules (:func:`problem`) and writes results into ``.grad`` (:func:`write_grad`). :class:`HyperSGD` is the online face: a ``torch.optim``
optimiser that learns its own lr / weight decay / momentum by one-pass or greedy
hypergradients while it trains.
"""

from bilevel.errors import HypergradWarning
from bilevel.hypergrad._common import HypergradResult
from bilevel.hypergrad.configured import from_config
from bilevel.hypergrad.forward import forward
from bilevel.hypergrad.hypersgd import HyperSGD
from bilevel.hypergrad.implicit import SOLVERS, implicit, one_pass
from bilevel.hypergrad.kit import Problem, load_state, problem, write_grad
from bilevel.hypergrad.meta_optimizer import MetaOptimizer
from bilevel.hypergrad.reversible import reversible
from bilevel.hypergrad.unrolled import greedy, unrolled

__all__ = [
    "SOLVERS", "HyperSGD", "HypergradResult", "HypergradWarning", "MetaOptimizer", "Problem",
    "forward", "from_config", "greedy", "implicit", "load_state", "one_pass", "problem", "reversible", "unrolled",
    "write_grad",
]
