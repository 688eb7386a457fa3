"""The keywords every method shares: the step offset ``start``, the Neumann ``terms``, and
``has_aux``; plus the deprecation path of the older spellings (``t=``, ``iters=`` for
Neumann series).

One meaning each, across methods:

* ``start``: the ``t`` passed to the first (or only) call of ``step``.
* ``terms``: the number of Neumann terms in total (``terms=1`` is the identity
  approximation), for :func:`~bilevel.hypergrad.implicit` and
  :func:`~bilevel.hypergrad.one_pass` alike.
* ``has_aux``: ``step`` returns ``(new_state, aux)``; ``aux`` is returned detached in
  :attr:`HypergradResult.aux` (one per step, in a list, for the multi-step methods).
"""

from __future__ import annotations

import warnings
from typing import Any

from bilevel.hypergrad._common import StepFn
from bilevel.tree import Tree, tree_detach


def step_offset(start: int, t: int | None, *, method: str) -> int:
    """``start``, or the deprecated ``t=`` (with a DeprecationWarning)."""
    if t is None:
        return start
    if start != 0:
        raise TypeError(f"{method}: pass start= only (t= is its deprecated old name), not both")
    warnings.warn(f"{method}(t=...) is deprecated: the step offset is called start= in every "
                  "method", DeprecationWarning, stacklevel=3)
    return t


def neumann_terms(terms: int | None, iters: int | None, *, default: int, method: str) -> int:
    """Total Neumann terms from ``terms``, or from the deprecated ``iters=K`` (K + 1 terms)."""
    if iters is None:
        return default if terms is None else terms
    if terms is not None:
        raise TypeError(f"{method}: pass terms= only (iters= is its deprecated old spelling "
                        "for Neumann series, with one term fewer), not both")
    warnings.warn(f"{method}(iters=K) for a Neumann series is deprecated: pass terms=K+1 (the "
                  "number of terms in total, as in one_pass)", DeprecationWarning, stacklevel=3)
    return iters + 1


class AuxSteps:
    """Wraps a ``has_aux`` step as a state-only step and keeps each step's aux, by ``t``.

    Recomputation (checkpointed segments) calls the step again for the same ``t``; the
    aux is then overwritten with an equal value, so each ``t`` holds exactly one.
    """

    def __init__(self, step: StepFn, has_aux: bool) -> None:
        self.step, self.has_aux = step, has_aux
        self.by_t: dict[int, Any] = {}

    def __call__(self, state: Tree, hparams: Tree, t: int) -> Tree:
        if not self.has_aux:
            return self.step(state, hparams, t)
        out = self.step(state, hparams, t)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError("has_aux=True: the step must return (new_state, aux), got "
                            f"{type(out).__name__}")
        self.by_t[t] = tree_detach(out[1])
        return out[0]

    def collected(self, ts: range) -> list[Any] | None:
        """The aux of each step in ``ts`` (``None`` without ``has_aux``)."""
        return [self.by_t.get(t) for t in ts] if self.has_aux else None
