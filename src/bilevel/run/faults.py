"""Fault injection for the crash and numerics tests, driven by one environment variable.

``BILEVEL_FAULT="point@n[,point@n...]"`` makes the *n*-th arrival at ``point`` (counted
from 1 within this process) either SIGKILL the process (:func:`kill_point`) or report True
(:func:`triggered`, used to inject a NaN). Unset, both cost one dictionary lookup.

Points used by bilevel: ``inner`` (inside the inner loop), ``hyper`` (after a hyper-step,
before its checkpoint), ``checkpoint_write`` (half-way through writing a checkpoint file),
``nan_hypergrad`` (a recipe replaces its hypergradient with NaN).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "BILEVEL_FAULT"
_hits: Counter[str] = Counter()


def _due(point: str) -> bool:
    spec = os.environ.get(ENV)
    if not spec:
        return False
    _hits[point] += 1
    for item in spec.split(","):
        name, _, count = item.strip().partition("@")
        if name == point and _hits[point] == int(count or 1):
            return True
    return False


def kill_point(point: str) -> None:
    """SIGKILL this process if ``BILEVEL_FAULT`` names this arrival at ``point``."""
    if _due(point):
        os.kill(os.getpid(), signal.SIGKILL)


def triggered(point: str) -> bool:
    """True if ``BILEVEL_FAULT`` names this arrival at ``point``."""
    return _due(point)
