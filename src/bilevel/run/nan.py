"""The non-finite policy of a run: ``skip``, ``rollback`` or ``abort`` (``run.nan_policy``).

A recipe checks its hypergradient (and updated meta-parameters) with :func:`all_finite`; when
that fails it calls :func:`on_nonfinite`, which logs a ``nonfinite`` event to the metrics and
returns what to do. ``rollback`` means: restore the last checkpoint, multiply the hyper
learning rate by :data:`ROLLBACK_FACTOR`, and checkpoint again at once so that a crash does
not undo the decision. After :data:`MAX_ROLLBACKS` rollbacks the run aborts.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from bilevel.errors import NonFiniteError
from bilevel.tree import Tree, tree_all_finite

ROLLBACK_FACTOR = 0.5
MAX_ROLLBACKS = 5

Policy = Literal["skip", "rollback", "abort"]


class _EventSink(Protocol):
    def event(self, step: int, kind: str, **info: Any) -> None: ...


def all_finite(*trees: Tree) -> bool:
    """True if every tensor in every tree is finite (no NaN, no inf)."""
    return all(bool(tree_all_finite(t)) for t in trees)


def on_nonfinite(
    sink: _EventSink, policy: Policy, *, step: int, what: str, rollbacks: int = 0
) -> Literal["skip", "rollback"]:
    """Log a non-finite event and decide what to do.

    Args:
        sink: the run directory (anything with ``event(step, kind, **info)``).
        policy: the configured ``run.nan_policy``.
        step: the step at which it happened.
        what: what was non-finite, e.g. ``"hypergradient"``.
        rollbacks: how many rollbacks the run has already made.

    Returns:
        ``"skip"`` (do not apply this update) or ``"rollback"``.

    Raises:
        NonFiniteError: for ``abort``, or when ``rollback`` was tried too often.
    """
    give_up = policy == "abort" or (policy == "rollback" and rollbacks >= MAX_ROLLBACKS)
    action = "abort" if give_up else policy
    sink.event(step, "nonfinite", what=what, policy=policy, action=action)
    if give_up:
        extra = f" after {rollbacks} rollbacks" if policy == "rollback" else ""
        others = "/".join(p for p in ("skip", "rollback") if p != policy)
        raise NonFiniteError(
            f"non-finite {what} at step {step}{extra} (run.nan_policy={policy}); lower the "
            f"hyper learning rate or set run.nan_policy to {others}",
            step=step,
            what=what,
        )
    return action  # type: ignore[return-value]
