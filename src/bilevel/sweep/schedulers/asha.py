"""ASHA: asynchronous successive halving (Li et al., MLSys 2020, Algorithm 2), and random search.

Rungs are budgets ``r_k = min_resource · η^k`` below ``max_resource``, plus ``max_resource``
itself as the last rung. Whenever a worker is free (:meth:`ASHA.suggest`), look at the rungs
from the top down: in rung ``k``, rank the trials that finished rung ``k`` by their value;
the first trial of the top ``⌊n_k / η⌋`` that has not been promoted yet is *promoted*: it
continues from its own checkpoint to budget ``r_{k+1}``. If no rung has a promotable trial,
start a new trial (configuration ``Space.draw(trial, seed=seed)``, i.e. initialisation ``trial`` of ``bilevel sweep --inits``) at
``r_0``. Ties go to the lower trial number; diverged trials (NaN/inf) rank last and are
never promoted.

This is the promotion form of ASHA: a paused trial can be promoted later, when enough
others have finished its rung (Ray Tune's ``ASHAScheduler`` instead decides to stop or
continue at each rung as a trial reaches it; Optuna's ``SuccessiveHalvingPruner`` likewise).

Example (η = 2, budgets 1, 2, 4; see tests/sweep/test_schedulers.py)::

    asha = ASHA(space, min_resource=1, max_resource=4, reduction_factor=2, max_trials=8, seed=0)
    job = asha.suggest()          # Job(trial=0, budget=1, kind="new")
    asha.report(job, 0.3)
"""

from __future__ import annotations

from bilevel.errors import ConfigError
from bilevel.sweep.schedulers._base import AbstractScheduler, Job, score
from bilevel.sweep.space import Space


def rung_budgets(*, min_resource: int, max_resource: int, reduction_factor: int) -> list[int]:
    """``[r_0, r_0·η, …] + [max_resource]`` (each below ``max_resource``)."""
    if not 0 < min_resource <= max_resource:
        raise ConfigError(f"--min-resource ({min_resource}) must be in [1, --max-resource "
                          f"({max_resource})]")
    if reduction_factor < 2:
        raise ConfigError(f"--reduction-factor ({reduction_factor}) must be at least 2")
    budgets, r = [], min_resource
    while r < max_resource:
        budgets.append(r)
        r *= reduction_factor
    return [*budgets, max_resource]


class ASHA(AbstractScheduler):
    """Asynchronous successive halving over ``max_trials`` trials (see the module doc)."""

    def __init__(self, space: Space, *, min_resource: int, max_resource: int,
                 reduction_factor: int = 4, max_trials: int, seed: int = 0) -> None:
        self.space, self.seed, self.max_trials = space, seed, max_trials
        self.eta = reduction_factor
        self.budgets = rung_budgets(min_resource=min_resource, max_resource=max_resource,
                                    reduction_factor=reduction_factor)
        self.results: list[dict[int, float]] = [{} for _ in self.budgets]  # rung -> trial -> value
        self.promoted: list[set[int]] = [set() for _ in self.budgets]
        self.configs: dict[int, dict[str, float]] = {}
        self._jobs = 0
        self._pending = 0

    def _job(self, trial: int, rung: int, kind: str) -> Job:
        job = Job(id=self._jobs, trial=trial, budget=self.budgets[rung],
                  config=self.configs[trial], kind=kind, rung=rung,  # type: ignore[arg-type]
                  start=self.budgets[rung - 1] if rung else 0)
        self._jobs += 1
        self._pending += 1
        return job

    def _promotable(self, rung: int) -> int | None:
        done = self.results[rung]
        ranked = sorted(done, key=lambda t: (score(done[t]), t))[: len(done) // self.eta]
        for trial in ranked:
            if trial not in self.promoted[rung] and score(done[trial]) < float("inf"):
                return trial
        return None

    def suggest(self) -> Job | None:
        for rung in reversed(range(len(self.budgets) - 1)):
            trial = self._promotable(rung)
            if trial is not None:
                self.promoted[rung].add(trial)
                return self._job(trial, rung + 1, "continue")
        if len(self.configs) < self.max_trials:
            trial = len(self.configs)
            self.configs[trial] = self.space.draw(trial, seed=self.seed)
            return self._job(trial, 0, "new")
        return None

    def report(self, job: Job, value: float) -> None:
        self.results[job.rung][job.trial] = value
        self._pending -= 1

    @property
    def done(self) -> bool:
        if self._pending or len(self.configs) < self.max_trials:
            return False
        return all(self._promotable(r) is None for r in range(len(self.budgets) - 1))


class RandomSearch(AbstractScheduler):
    """``max_trials`` configurations drawn from the space, each trained to ``max_resource``."""

    def __init__(self, space: Space, *, max_resource: int, max_trials: int, seed: int = 0) -> None:
        self.space, self.max_resource, self.max_trials, self.seed = (
            space, max_resource, max_trials, seed)
        self.results: dict[int, float] = {}
        self._next = 0

    def suggest(self) -> Job | None:
        if self._next >= self.max_trials:
            return None
        t = self._next
        self._next += 1
        return Job(id=t, trial=t, budget=self.max_resource,
                   config=self.space.draw(t, seed=self.seed))

    def report(self, job: Job, value: float) -> None:
        self.results[job.trial] = value

    @property
    def done(self) -> bool:
        return len(self.results) >= self.max_trials
