"""PBT: population based training (Jaderberg et al., 2017) in synchronous generations.

A population of ``population`` trials trains in generations of ``interval`` resource units
(weight steps) up to ``max_resource``. After generation ``g`` every member has reported its
value; members are ranked (lower is better, diverged last, ties to the lower trial number)
and, with ``n = min(⌈population · quantile⌉, ⌊population / 2⌋)``:

* the best ``n`` and the middle continue unchanged from their own checkpoints;
* each of the worst ``n`` *exploits*: it copies the checkpoint of a donor drawn uniformly
  from the best ``n`` (weights, optimiser and learned state, data order) and its config;
* and then *explores*: every searched key is, with probability ``resample_probability``,
  drawn afresh from the space, else multiplied by a factor drawn from ``factors`` (×1.2 or
  ×0.8 by default, Ray Tune's defaults), and kept inside the range.

All random choices for generation ``g`` come from ``seeded_rng(seed, "pbt", g)``, so a sweep
is reproducible (Ray Tune's asynchronous ``PopulationBasedTraining`` has no seed). The
initial configurations are ``Space.draw(t, seed=seed)``, as in the other schedulers.
"""

from __future__ import annotations

import math
import random

from bilevel.errors import ConfigError
from bilevel.sweep.schedulers._base import AbstractScheduler, Job, score
from bilevel.sweep.space import Space, seeded_rng


class PBT(AbstractScheduler):
    """Synchronous PBT with truncation selection and perturb/resample exploration."""

    def __init__(self, space: Space, *, population: int, interval: int, max_resource: int,
                 quantile: float = 0.25, resample_probability: float = 0.25,
                 factors: tuple[float, ...] = (1.2, 0.8), seed: int = 0) -> None:
        if population < 2:
            raise ConfigError(f"--population ({population}) must be at least 2 for PBT")
        if not 0 < interval <= max_resource:
            raise ConfigError(f"--interval ({interval}) must be in [1, max budget ({max_resource})]")
        if not 0 < quantile <= 0.5:
            raise ConfigError(f"--quantile ({quantile}) must be in (0, 0.5]")
        self.space, self.seed = space, seed
        self.population, self.interval, self.max_resource = population, interval, max_resource
        self.quantile, self.resample_probability, self.factors = (
            quantile, resample_probability, factors)
        self.generation = 0
        self.configs = {t: space.draw(t, seed=seed) for t in range(population)}
        self.values: dict[int, float] = {}     # this generation's results
        self.last_job: dict[int, int] = {}     # trial -> id of its latest job
        self.plan: dict[int, Job] = {}         # this generation's jobs not yet handed out
        self.history: list[dict[str, object]] = []
        self._jobs = 0
        self._plan_generation({t: ("new", None) for t in range(population)})

    def _budget(self, generation: int) -> int:
        return min((generation + 1) * self.interval, self.max_resource)

    def _plan_generation(self, moves: dict[int, tuple[str, int | None]]) -> None:
        start = self._budget(self.generation - 1) if self.generation else 0
        for t, (kind, donor) in sorted(moves.items()):
            info = {"donor_job": self.last_job[donor]} if donor is not None else {}
            self.plan[t] = Job(id=self._jobs, trial=t, budget=self._budget(self.generation),
                               config=dict(self.configs[t]), kind=kind,  # type: ignore[arg-type]
                               rung=self.generation, donor=donor, start=start, info=info)
            self._jobs += 1

    def explore(self, config: dict[str, float], rng: random.Random) -> dict[str, float]:
        """Resample each key with probability ``resample_probability``, else perturb it."""
        new = {}
        for key, param in self.space.items():
            if rng.random() < self.resample_probability:
                new[key] = param.sample(rng)
            else:
                new[key] = param.clip(config[key] * rng.choice(self.factors))
        return new

    def _select(self) -> dict[int, tuple[str, int | None]]:
        ranked = sorted(self.values, key=lambda t: (score(self.values[t]), t))
        n = min(math.ceil(self.population * self.quantile), self.population // 2)
        top, bottom = ranked[:n], set(ranked[len(ranked) - n:])
        rng = seeded_rng(self.seed, "pbt", self.generation)
        moves: dict[int, tuple[str, int | None]] = {}
        for t in ranked:
            if t in bottom:
                donor = rng.choice(top)
                self.configs[t] = self.explore(self.configs[donor], rng)
                moves[t] = ("exploit", donor)
            else:
                moves[t] = ("continue", None)
        self.history.append({"generation": self.generation, "ranked": ranked,
                             "exploits": {t: d for t, (k, d) in moves.items() if d is not None}})
        return moves

    def suggest(self) -> Job | None:
        if not self.plan:
            return None
        job = self.plan.pop(min(self.plan))
        self.last_job[job.trial] = job.id
        return job

    def report(self, job: Job, value: float) -> None:
        if job.rung != self.generation:
            raise ValueError(f"PBT got a result of generation {job.rung} during {self.generation}")
        self.values[job.trial] = value
        if len(self.values) < self.population or self._budget(self.generation) >= self.max_resource:
            return
        moves = self._select()
        self.generation += 1
        self.values = {}
        self._plan_generation(moves)

    @property
    def done(self) -> bool:
        return (not self.plan and len(self.values) == self.population
                and self._budget(self.generation) >= self.max_resource)
