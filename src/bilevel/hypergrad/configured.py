"""The engine call a config section asks for: :func:`from_config`.

A recipe declares which hypergradient methods it supports as config sections
(:mod:`bilevel.run.methods`); this is the one place a section becomes a call, so every recipe
reads ``steps``, ``truncate``, ``solver``, ``iters`` and ``terms`` the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

from bilevel.hypergrad._common import HypergradResult
from bilevel.hypergrad.forward import forward
from bilevel.hypergrad.implicit import implicit, one_pass
from bilevel.hypergrad.unrolled import greedy, unrolled
from bilevel.run.methods import Implicit, Method


class EngineCall(Protocol):
    """``call(step, outer_loss, state, hparams, **keywords) -> HypergradResult``."""

    def __call__(self, step: Any, outer_loss: Any, state: Any, hparams: Any,
                 **keywords: Any) -> HypergradResult: ...


def from_config(cfg: Method) -> EngineCall:
    """The hypergradient method of ``cfg`` with its settings bound.

    The result takes the engine contract's four arguments, ``step``, ``outer_loss``, the
    state (the initial one; for ``implicit`` and ``one_pass`` the current one) and
    ``hparams``, plus any engine keyword (``start``, ``has_aux``, ``check_finite``, ...); a
    keyword given there overrides the config's.

    Example::

        r = hypergrad.from_config(config.hypergrad)(step, outer_loss, state, hp, start=t)
    """
    build = _BUILDERS.get(getattr(cfg, "method", None))
    if build is None:
        raise TypeError(f"not a hypergradient method section: {cfg!r}")
    return build(cfg)


def _implicit(cfg: Implicit) -> EngineCall:
    series = {"terms": cfg.iters + 1} if cfg.solver == "neumann" else {"iters": cfg.iters}
    return functools.partial(implicit, solver=cfg.solver, alpha=cfg.alpha or 1.0, **series)


# method -> its call with the section's settings bound (the section's own keys, all read).
_BUILDERS: dict[Any, Callable[[Any], EngineCall]] = {
    "unrolled": lambda c: functools.partial(unrolled, steps=c.steps),
    "checkpointed": lambda c: functools.partial(unrolled, steps=c.steps, checkpoint=True,
                                                segment=c.segment),
    "truncated": lambda c: functools.partial(unrolled, steps=c.steps, truncate=c.truncate),
    "forward": lambda c: functools.partial(forward, steps=c.steps),
    "implicit": _implicit,
    "one_pass": lambda c: functools.partial(one_pass, terms=c.terms),
    "greedy": lambda c: greedy,
}
