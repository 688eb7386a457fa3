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
=====================  =============================================================
"""

from bilevel.errors import HypergradWarning
from bilevel.hypergrad._common import HypergradResult
from bilevel.hypergrad.forward import forward
from bilevel.hypergrad.implicit import SOLVERS, implicit, one_pass
from bilevel.hypergrad.meta_optimizer import MetaOptimizer
from bilevel.hypergrad.unrolled import greedy, unrolled

__all__ = ["SOLVERS", "HypergradResult", "HypergradWarning", "MetaOptimizer", "forward", "greedy", "implicit", "one_pass", "unrolled"]
