"""Optuna: Bayesian optimisation (TPE, GP) embedded, and one study shared by many workers.

**Embedded BO** (:class:`OptunaBO`, used by the local engine): a scheduler over an Optuna
study stored in the sweep directory (``study.journal``, Optuna's ``JournalFileBackend``; or
any ``--storage`` URL). The first ``startup`` trials are initialisations ``0..startup-1`` of
``bilevel sweep --inits`` (Clarke et al.'s BayesOpt: 5 random + 25 guided = 30), the rest
are proposed by TPE or the GP sampler. Trial ``k``'s sampler is seeded by ``(seed, k)``
(Optuna does not store sampler state), so a resumed or repeated BO sweep proposes the same
points. A diverged run is told the worst finite value seen so far (``bayes_opt`` users cap
it by hand; Clarke et al. used 150 for Energy).

**Many workers** (:func:`worker`, ``bilevel sweep --engine optuna --storage URL``): start one
worker per machine (or process) on the same study, PostgreSQL/MySQL for many workers, a
journal file on a shared disk for a few (SQLite only for one machine); workers may start
together on a new file (:func:`open_study` retries the schema race). Trial ``t`` starts from
initialisation ``t`` for ``t < 5``, later proposals are seeded by ``(seed, trial number)``, so
one worker is reproducible from ``--seed``. Each trial is a run directory ``OUT/trial-NNNN``; with ``--scheduler asha`` it trains in rungs and Optuna's
``SuccessiveHalvingPruner`` stops the poor ones. A trial whose worker died (its pid is gone
on this host, or its run's lock heartbeat is older than ``stale_after`` seconds) is marked
failed and re-enqueued with the same parameters and run directory, so the retry resumes from
the dead trial's last checkpoint instead of starting over.
"""

from __future__ import annotations

import math
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bilevel.errors import ConfigError, SweepStoppedError
from bilevel.run.lock import pid_alive
from bilevel.sweep.engines._jobs import JobResult, JobSpec, execute
from bilevel.sweep.schedulers import AbstractScheduler, Job, Space, rung_budgets


def storage_for(url: str | None, root: Path) -> Any:
    """``url`` as Optuna storage; ``None`` -> a journal file in ``root``; a path ending in
    ``.journal`` -> a journal file there; anything else is an RDB URL (``sqlite:///``,
    ``postgresql://``)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if url is None or url.endswith(".journal"):
        path = Path(url) if url else root / "study.journal"
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    return optuna.storages.RDBStorage(url)


# What a second process sees when two create the tables of a new RDB file at once (Optuna's
# create_all + alembic stamp are not atomic): one of them wins, the other's retry loads it.
_SCHEMA_RACE = ("already exists", "UNIQUE constraint failed", "database is locked",
                "duplicate key value", "Duplicate entry")


def _schema_race(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("sqlalchemy") and any(
        m in str(exc) for m in _SCHEMA_RACE)


def open_study(*, storage: str | None, root: Path, study_name: str, pruner: Any = None,
               attempts: int = 10, wait: float = 0.1) -> Any:
    """Create the study, or load it if it exists, safe against workers that start together
    on a new SQLite/RDB file: a schema race (``table ... already exists``, ``UNIQUE constraint
    failed: alembic_version``) is retried up to ``attempts`` times with a jittered wait."""
    import optuna

    for attempt in range(attempts):
        try:
            return optuna.create_study(storage=storage_for(storage, root), study_name=study_name,
                                       direction="minimize", load_if_exists=True, pruner=pruner)
        except Exception as exc:
            if attempt + 1 == attempts or not _schema_race(exc):
                raise
            time.sleep(wait * (attempt + 1) * (0.5 + random.random()))  # jitter: not in step
    raise AssertionError("unreachable")


def make_sampler(name: str, *, seed: int) -> Any:
    """``tpe`` or ``gp`` (Optuna's Gaussian-process BO), seeded; no startup phase (the
    startup points are enqueued initialisations)."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=0)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=0, deterministic_objective=True)
    raise ConfigError(f"--sampler {name!r}: use 'tpe' or 'gp'")


def _quiet() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


class OptunaBO(AbstractScheduler):
    """BO as a scheduler: ``n_trials`` full-budget jobs proposed by an Optuna sampler."""

    def __init__(self, space: Space, *, storage: Any, study_name: str, sampler: str = "tpe",
                 n_trials: int = 30, startup: int = 5, max_resource: int, seed: int = 0) -> None:
        import optuna

        _quiet()
        self.space, self.sampler, self.n_trials, self.startup = space, sampler, n_trials, startup
        self.max_resource, self.seed = max_resource, seed
        self.study = optuna.create_study(storage=storage, study_name=study_name,
                                         direction="minimize", load_if_exists=True)
        self.dists = {k: p.to_optuna() for k, p in space.items()}
        self._next, self._reported = 0, 0

    def suggest(self) -> Job | None:
        k = self._next
        if k >= self.n_trials:
            return None
        trials = self.study.get_trials(deepcopy=False)
        if k < len(trials):  # proposed by an earlier (killed) process: same point again
            params = dict(trials[k].params)
        else:
            self.study.sampler = make_sampler(self.sampler, seed=self.seed * 1_000_003 + k)
            if k < self.startup:
                self.study.enqueue_trial(self.space.draw(k, seed=self.seed))
            trial = self.study.ask(self.dists)
            if trial.number != k:
                raise ConfigError(f"study {self.study.study_name}: trial {trial.number} where "
                                  f"{k} was expected; another process uses this study (use "
                                  "--engine optuna for several workers)")
            params = dict(trial.params)
        self._next += 1
        return Job(id=k, trial=k, budget=self.max_resource, config=params)

    def report(self, job: Job, value: float) -> None:
        import optuna

        self._reported += 1
        frozen = self.study.get_trials(deepcopy=False)[job.id]
        if frozen.state.is_finished():
            return  # told before a kill; the ledger replays it
        finite = [t.value for t in self.study.get_trials(deepcopy=False)
                  if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
        if math.isfinite(value):
            self.study.tell(job.id, value)
        elif finite:
            self.study.tell(job.id, max(finite))
        else:
            self.study.tell(job.id, state=optuna.trial.TrialState.FAIL)

    @property
    def done(self) -> bool:
        return self._reported >= self.n_trials


# -- many workers on one study -----------------------------------------------------------

def _stale(trial: Any, *, stale_after: float) -> bool:
    who = trial.user_attrs.get("worker")
    if who and who.get("host") == socket.gethostname():
        return not pid_alive(int(who["pid"]))
    lock = Path(trial.user_attrs.get("path", "")) / "lock"
    last = lock.stat().st_mtime if lock.exists() else trial.datetime_start.timestamp()
    return time.time() - last > stale_after


def retry_stale(study: Any, *, stale_after: float = 60.0) -> list[int]:
    """Fail RUNNING trials whose worker is dead and enqueue them again (same parameters,
    same run directory, so the retry resumes from the last checkpoint). Returns their
    numbers. Two workers racing for one trial: only the one that fails it re-enqueues."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError

    retried = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not _stale(t, stale_after=stale_after):
            continue
        try:
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        except (UpdateFinishedTrialError, RuntimeError):
            continue
        attrs = {k: t.user_attrs[k] for k in ("path", "index") if k in t.user_attrs}
        study.enqueue_trial(dict(t.params), user_attrs={**attrs, "retry_of": t.number})
        retried.append(t.number)
    return retried


def _count(study: Any) -> tuple[int, int]:
    import optuna

    s = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    live = sum(t.state in (s.COMPLETE, s.PRUNED, s.RUNNING, s.WAITING) for t in trials)
    return live, sum(t.state == s.WAITING for t in trials)


class _Given:
    """An Optuna sampler that returns given values (an initialisation of the space)."""

    def __init__(self, values: dict[str, float]) -> None:
        self.values = values

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: Any, trial: Any, space: Any) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
        return self.values[name]

    def before_trial(self, study: Any, trial: Any) -> None:
        pass

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        pass


def _propose(study: Any, trial: Any, space: Space, *, index: int, seed: int, sampler: str,
             startup: int) -> dict[str, float]:
    """Suggest ``trial``'s parameters: initialisation ``index`` for the first ``startup``
    indices (the draws of ``bilevel sweep --inits``), else the sampler seeded by
    ``(seed, trial number)``. A retried trial keeps its enqueued (fixed) parameters."""
    import optuna

    # Chosen after `ask` has numbered the trial (enqueuing the draws ahead would race with
    # the other workers' asks); a retry's enqueued parameters take precedence in `suggest`.
    study.sampler = (_Given(space.draw(index, seed=seed)) if index < startup else
                     make_sampler(sampler, seed=seed * 1_000_003 + trial.number))
    for name, p in space.items():
        d = p.to_optuna()
        assert isinstance(d, optuna.distributions.FloatDistribution)
        trial.suggest_float(name, d.low, d.high, log=d.log)
    return dict(trial.params)


def _fresh_index(study: Any, number: int) -> int:
    """A new trial's index: how many trials before it were not retries (retries take trial
    numbers too, and are marked when enqueued, so this does not depend on timing)."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.number < number and "retry_of" not in t.user_attrs)


def _job_seconds(trial: Any, result: JobResult) -> None:
    trial.set_user_attr("seconds", float(trial.user_attrs.get("seconds", 0.0)) + result.seconds)
    trial.set_user_attr("steps", int(trial.user_attrs.get("steps", 0)) + result.steps)


def worker(*, space: Space, root: str | Path, configs: Sequence[str], study_name: str,
           storage: str | None = None, overrides: Sequence[str] = (), metric: str = "val/loss",
           seed: int = 0, n_trials: int, sampler: str = "tpe", max_resource: int,
           asha: dict[str, int] | None = None, stale_after: float = 60.0, startup: int = 5,
           on_result: Callable[[Job, JobResult], None] | None = None) -> Any:
    """One worker of a shared study: take trials until ``n_trials`` are done or running;
    returns the study.

    Trial ``t`` (``index`` user attribute: the t-th trial that is not a retry; a retry keeps
    the index of the trial it retries) trains with
    ``run.seed = seed + t`` in ``root/trial-{t:04d}``; the first ``startup`` trials are
    initialisations ``0..startup-1``, later ones are proposed by ``sampler`` seeded with
    ``(seed, trial number)``. With one worker the sweep is therefore reproducible from
    ``seed``; with several, what the sampler has seen when it proposes depends on timing.

    Args:
        asha: ``{"min_resource", "reduction_factor"}`` to train in rungs under Optuna's
            ``SuccessiveHalvingPruner`` (ASHA); ``None`` trains every trial to the end.

    Raises:
        SweepStoppedError: a trial could not start for a cause every trial shares (missing
            data, invalid config); the trial is enqueued again, so the same command resumes.
    """
    import optuna

    _quiet()
    root = Path(root)
    pruner = (optuna.pruners.SuccessiveHalvingPruner(
        min_resource=asha["min_resource"], reduction_factor=asha["reduction_factor"])
        if asha else optuna.pruners.NopPruner())
    budgets = (rung_budgets(min_resource=asha["min_resource"], max_resource=max_resource,
                            reduction_factor=asha["reduction_factor"]) if asha else [max_resource])
    study = open_study(storage=storage, root=root, study_name=study_name, pruner=pruner)
    while True:
        retry_stale(study, stale_after=stale_after)
        live, waiting = _count(study)
        if live >= n_trials and not waiting:
            return study
        trial = study.ask()
        index = int(trial.user_attrs.get("index", _fresh_index(study, trial.number)))
        path = trial.user_attrs.get("path") or str(root / f"trial-{index:04d}")
        params = _propose(study, trial, space, index=index, seed=seed, sampler=sampler,
                          startup=startup)
        trial.set_user_attr("index", index)
        trial.set_user_attr("path", path)
        trial.set_user_attr("worker", {"pid": os.getpid(), "host": socket.gethostname()})
        value, start = math.nan, 0
        for rung, budget in enumerate(budgets):
            job = Job(id=trial.number, trial=index, budget=budget, config=params,
                      kind="new" if rung == 0 else "continue", rung=rung, start=start)
            result = execute(JobSpec(job, path, tuple(configs), tuple(overrides), metric, seed))
            if result.exit_code:  # every trial would fail so: stop, leave it to be rerun
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                study.enqueue_trial(params, user_attrs={"index": index, "path": path,
                                                        "retry_of": trial.number})
                raise SweepStoppedError(
                    f"trial {index} could not start, and every other trial would fail the "
                    f"same way, so this worker stopped: {result.error}\nFix this and run the "
                    "same command again: finished trials are kept.",
                    exit_code=result.exit_code)
            _job_seconds(trial, result)
            value, start = result.value, budget
            if on_result:
                on_result(job, result)
            if not math.isfinite(value):
                break
            trial.report(value, budget)
            if budget < max_resource and trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            trial.set_user_attr("summary", result.summary)
            study.tell(trial, value)
            continue
        if not math.isfinite(value):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)


def study_best(study: Any, *, max_resource: int) -> dict[str, Any] | None:
    """The best trial that finished the full budget, as the local engine's ``best.json``
    entry: ``{"value", "job", "run_dir", "summary"}`` (``job`` as a ledger records it)."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False,
                                        states=(optuna.trial.TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]
    if not done:
        return None
    t = min(done, key=lambda t: (t.value, t.number))
    index = int(t.user_attrs.get("index", t.number))
    job = Job(id=t.number, trial=index, budget=max_resource, config=dict(t.params))
    return {"value": float(t.value), "job": job.to_json(), "run_dir": t.user_attrs.get("path"),
            "summary": t.user_attrs.get("summary", {})}


def study_totals(study: Any) -> dict[str, float]:
    """Compute spent by the study's finished trials (as :func:`~.local_engine.totals`)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    return {"jobs": float(len(trials)),
            "trial_steps": float(sum(int(t.user_attrs.get("steps", 0)) for t in trials)),
            "seconds": float(sum(float(t.user_attrs.get("seconds", 0.0)) for t in trials))}
