"""Scheduled sweeps: random search, ASHA, PBT and BO over any recipe and algorithm config.

    bilevel sweep onepass/uci_energy.yaml -a onepass/ours_wd_lr_m.yaml \\
        --scheduler asha --trials 64 --parallel 2 --out runs/asha-ours

Every variant (``-a`` config) gets its own sweep in ``OUT/<variant>/<scheduler>/`` over the
same search space (the recipe's ``SEARCH_SPACE``, ``--space FILE``, narrowed with
``--search``), on the engine asked for: ``local`` (embedded, reproducible, resumable; see
:mod:`bilevel.sweep.engines.local_engine`), ``optuna`` (this process is one worker of a
shared study) or ``ray`` (Ray Tune). The resource is ``run.max_steps`` (weight steps for
``onepass``); trials minimise ``--metric`` (default ``val/loss``). When a sweep ends
(any engine) it writes ``best.json`` with the plain ``bilevel run`` command that replays its
best trial.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bilevel.errors import ConfigError
from bilevel.sweep.engines import JobResult, best, run_scheduler, totals
from bilevel.sweep.plan import default_space, variant_labels
from bilevel.sweep.schedulers import ASHA, PBT, AbstractScheduler, Job, RandomSearch, Space

SCHEDULERS = ("random", "asha", "pbt", "bo")


def _space(recipe: str, space: Mapping[str, Any] | None, search: Sequence[str]) -> Space:
    from bilevel.recipes import get

    full = Space.from_dict(space if space is not None else default_space(get(recipe)))
    if not full:
        raise ConfigError(f"recipe {recipe!r} has no SEARCH_SPACE: give --space FILE")
    return full.restrict(list(search)) if search else full


def make_scheduler(name: str, space: Space, *, root: Path, trials: int, max_resource: int,
                   min_resource: int | None, reduction_factor: int, population: int,
                   interval: int | None, sampler: str, storage: str | None,
                   seed: int) -> AbstractScheduler:
    """The scheduler ``name`` with the sweep's settings (defaults: seeds.md §3.5, shrunk)."""
    if name == "random":
        return RandomSearch(space, max_resource=max_resource, max_trials=trials, seed=seed)
    if name == "asha":
        return ASHA(space, min_resource=min_resource or max(1, max_resource // 64),
                    max_resource=max_resource, reduction_factor=reduction_factor,
                    max_trials=trials, seed=seed)
    if name == "pbt":
        return PBT(space, population=population, interval=interval or max(1, max_resource // 10),
                   max_resource=max_resource, seed=seed)
    if name == "bo":
        from bilevel.sweep.engines.optuna_engine import OptunaBO, storage_for

        return OptunaBO(space, storage=storage_for(storage, root), study_name="bo",
                        sampler=sampler, n_trials=trials, max_resource=max_resource, seed=seed)
    raise ConfigError(f"--scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")


def replay_command(configs: Sequence[str], overrides: Sequence[str], job: Mapping[str, Any],
                   seed: int) -> str:
    """The ``bilevel run`` command that trains ``job``'s trial from scratch to its budget."""
    sets = [*overrides, *(f"{k}={v!r}" for k, v in job["config"].items()),
            f"run.seed={seed + job['trial']}", f"run.max_steps={job['budget']}"]
    return shlex.join(["bilevel", "run", *configs, *(a for s in sets for a in ("--set", s))])


def _write_best(root: Path, found: dict[str, Any] | None, spent: dict[str, float] | None,
                configs: Sequence[str], overrides: Sequence[str], seed: int) -> dict[str, Any]:
    """``root/best.json``: the best trial (value, job, run_dir, summary, the ``bilevel run``
    command that replays it) and the compute spent; the same for every engine."""
    entry: dict[str, Any] = {"root": str(root)}
    if spent is not None:
        entry["totals"] = spent
    if found is not None:
        entry["best"] = {**found, "replay": replay_command(configs, overrides, found["job"],
                                                           seed)}
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"best.json.{os.getpid()}"  # Optuna workers may write it together
    tmp.write_text(json.dumps(entry, indent=1))
    tmp.replace(root / "best.json")
    return entry


def scheduled_sweep(base: Sequence[str], algorithms: Sequence[str] = (), *, scheduler: str,
                    out: str | Path, trials: int, engine: str = "local", parallel: int = 1,
                    seed: int = 0, overrides: Sequence[str] = (),
                    space: Mapping[str, Any] | None = None, search: Sequence[str] = (),
                    metric: str = "val/loss", max_resource: int | None = None,
                    min_resource: int | None = None, reduction_factor: int = 4,
                    population: int = 8, interval: int | None = None, sampler: str = "tpe",
                    storage: str | None = None, ray_address: str | None = None,
                    on_result: Callable[[str, Job, JobResult], None] | None = None
                    ) -> dict[str, dict[str, Any]]:
    """Run ``scheduler`` over every variant; returns ``{variant: {"best", "totals", ...}}``."""
    from bilevel.recipes import find_config, resolve

    variants = variant_labels([str(find_config(a)) for a in algorithms])
    base = [str(find_config(b)) for b in base]
    out = Path(out)
    report: dict[str, dict[str, Any]] = {}
    for label, algo in variants.items():
        configs = [*base, *([algo] if algo else [])]
        recipe, config, _ = resolve(configs, overrides)
        budget = max_resource or int(config.run.max_steps)  # type: ignore[attr-defined]
        sp = _space(recipe, space, search)
        root = out / label / scheduler
        common = {"configs": configs, "overrides": list(overrides), "metric": metric,
                  "seed": seed}
        show = ((lambda j, r, lab=label: on_result(lab, j, r)) if on_result else None)
        if engine == "ray":
            from bilevel.sweep.engines.ray_engine import ray_best, run_ray

            grid = run_ray(space=sp, root=root, scheduler=scheduler, n_trials=trials,
                           max_resource=budget, min_resource=min_resource,
                           reduction_factor=reduction_factor, interval=interval,
                           address=ray_address, num_cpus=parallel, **common)
            report[label] = _write_best(root, ray_best(grid, root), None, configs, overrides,
                                        seed)
            continue
        if engine == "optuna":
            from bilevel.sweep.engines.optuna_engine import study_best, study_totals, worker

            asha = ({"min_resource": min_resource or max(1, budget // 64),
                     "reduction_factor": reduction_factor} if scheduler == "asha" else None)
            if scheduler not in ("asha", "bo"):
                raise ConfigError("--engine optuna runs --scheduler bo or asha "
                                  "(Optuna has no PBT); use --engine local or ray")
            study = worker(space=sp, root=root, study_name=f"{label}-{scheduler}",
                           storage=storage, n_trials=trials, sampler=sampler,
                           max_resource=budget, asha=asha, on_result=show, **common)
            entry = _write_best(root, study_best(study, max_resource=budget),
                                study_totals(study), configs, overrides, seed)
            report[label] = {**entry, "study": f"{label}-{scheduler}"}
            continue
        if engine != "local":
            raise ConfigError(f"--engine {engine!r}: choose local, optuna or ray")
        sched = make_scheduler(scheduler, sp, root=root, trials=trials, max_resource=budget,
                               min_resource=min_resource, reduction_factor=reduction_factor,
                               population=population, interval=interval, sampler=sampler,
                               storage=storage, seed=seed)
        ledger = run_scheduler(sched, root=root, parallel=parallel, snapshots=scheduler == "pbt",
                               on_result=show, **common)
        found = best(ledger)
        report[label] = _write_best(
            root, None if found is None else {
                "value": found[1].value, "job": found[0]["job"], "run_dir": found[0]["path"],
                "summary": found[1].summary}, totals(ledger), configs, overrides, seed)
    return report
