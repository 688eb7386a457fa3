"""What every scheduler shares: the :class:`Job` it hands out and the two-call protocol.

A scheduler is pure decision logic. An engine asks it for work and tells it results::

    while (job := scheduler.suggest()) is not None or pending:
        ...run job (train trial ``job.trial`` with ``job.config`` up to ``job.budget``)...
        scheduler.report(job, value)          # the objective, lower is better

``suggest`` returns ``None`` when nothing can start until a pending result arrives (or the
sweep is done: :attr:`AbstractScheduler.done`). Decisions depend only on the seed and on the
sequence of ``suggest``/``report`` calls, so an engine that feeds results back in a fixed
order (the local engine uses submission order) gets the same sweep every time, and a killed
sweep is resumed by replaying its ledger.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["new", "continue", "exploit"]


@dataclass(frozen=True)
class Job:
    """Train ``trial`` with ``config`` up to ``budget`` resource units (weight steps).

    ``kind``: ``new`` (a fresh run), ``continue`` (resume the trial's own run with a higher
    budget: an ASHA promotion or a PBT survivor), ``exploit`` (restart from ``donor``'s
    checkpoint at ``start`` with a perturbed ``config``: PBT).
    """

    id: int
    trial: int
    budget: int
    config: dict[str, float]
    kind: Kind = "new"
    rung: int = 0
    donor: int | None = None
    start: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "trial": self.trial, "budget": self.budget,
                "config": self.config, "kind": self.kind, "rung": self.rung,
                "donor": self.donor, "start": self.start, "info": self.info}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Job:
        return cls(**d)


def score(value: float) -> float:
    """The value used for ranking: non-finite (diverged) becomes +inf, i.e. the worst."""
    return value if math.isfinite(value) else math.inf


class AbstractScheduler(ABC):
    """Decides which trial runs next, for how long, and with which configuration."""

    @abstractmethod
    def suggest(self) -> Job | None:
        """The next job, or ``None`` if none can start before a pending job reports."""

    @abstractmethod
    def report(self, job: Job, value: float) -> None:
        """The objective (lower is better; NaN/inf = diverged) of a finished job."""

    @property
    @abstractmethod
    def done(self) -> bool:
        """True when no job will ever be suggested again."""
