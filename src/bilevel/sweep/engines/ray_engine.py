"""Ray Tune: ASHA, PBT and BO (``OptunaSearch``) across the machines of a Ray cluster.

Ray is optional and imported only here, when ``--engine ray`` is asked for
(``pip install 'bilevel[ray]'``). Each Ray trial trains bilevel run directories with the same
job runner as the local engine, every ``report_every`` resource units:

* it *reports* ``objective`` (the ``--metric`` of the run's summary) and ``resource``
  (trained ``run.max_steps``) through ``tune.report``;
* it *checkpoints* through bilevel's checkpoints: the Ray checkpoint is a directory holding the
  run's newest ``bilevel`` checkpoint payload and ``bilevel.json`` (resource, config);
* given a Ray checkpoint (``Tuner.restore`` after a crash, a retried failure, or a PBT
  exploit) it starts a new run directory from that payload: unchanged for its own trial,
  adopted to the new config for a PBT exploit (by the recipe's ``adopt_state``).

So ``Tuner.restore`` resumes a killed sweep, and a trial on a worker that died is retried
from its last report (``FailureConfig(max_failures=3)``).

Seeds: trial ``t`` (Ray numbers trials in creation order) runs with ``run.seed = seed + t``
from initialisation ``t`` (every trial of random/ASHA, PBT's population, BO's first 5; BO's
later points come from TPE seeded by ``seed``). Ray's ASHA stops trials at rungs as results
arrive and its PBT perturbs with Python's unseeded ``random`` asynchronously, so which trials
stop, what PBT explores, and BO's proposals with several trials at once depend on timing.

Privacy: without ``--ray-address`` a private instance starts (:func:`.ray_instance.start_local`): every
socket on loopback, no dashboard, its processes ended when the driver ends, even by SIGKILL.
``--ray-address HOST:PORT`` joins a head (:func:`.ray_instance.connect`), failing with a ConfigError within
seconds when none answers; Ray's token authentication must be on (see docs/sweeps.md).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bilevel.errors import ConfigError, SweepStoppedError
from bilevel.sweep.engines._jobs import JobSpec, execute, job_overrides, warm_start
from bilevel.sweep.engines.ray_instance import connect, require_ray, start_local
from bilevel.sweep.schedulers import Job, Space


def _trial_index(trial_id: str) -> int:
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else abs(hash(trial_id)) % 100_000


def _restore(spec: dict[str, Any], config: dict[str, float], run: Path, job: Job) -> int:
    """Start ``run`` from the trial's Ray checkpoint, if any; returns the resource reached."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        meta = json.loads((Path(d) / "bilevel.json").read_text())
        snap = run.parent / f"{run.name}.donor.pt"
        shutil.copy(Path(d) / "checkpoint.pt", snap)
    same = meta["config"] == config
    start = int(meta["resource"])
    sj = JobSpec(Job(id=0, trial=job.trial, budget=start, config=config), str(run),
                 tuple(spec["configs"]), tuple(spec["overrides"]), spec["metric"], spec["seed"])
    warm_start(snap, run, spec["configs"], job_overrides(sj), adopt=not same)
    snap.unlink()
    return start


_SHARED = "bilevel: a cause every trial shares, exit code"


def _shared_cause(grid: Any) -> SweepStoppedError | None:
    """The first trial error that every trial would share (missing data, a bad config)."""
    for err in grid.errors:
        found = re.search(re.escape(_SHARED) + r" (\d+): (.*)", str(err))
        if found:
            return SweepStoppedError(
                f"the trials could not start, for a cause every trial shares: "
                f"{found.group(2).strip()}\nFix this and run the same command again: Ray "
                "resumes the experiment (errored trials are rerun).",
                exit_code=int(found.group(1)))
    return None


def _trainable(config: dict[str, float], spec: dict[str, Any]) -> None:
    """Ray function trainable: train in chunks, report and checkpoint after each."""
    import torch
    from ray import tune

    torch.set_num_threads(1)
    trial_id = tune.get_context().get_trial_id()
    index = _trial_index(trial_id)
    home = Path(spec["root"]) / "runs" / trial_id
    home.mkdir(parents=True, exist_ok=True)
    run = home / f"seg-{len(list(home.glob('seg-*'))):03d}"  # a fresh directory per (re)start
    config = {k: float(config[k]) for k in spec["keys"]}
    start = _restore(spec, config, run, Job(id=0, trial=index, budget=0, config=config))
    for budget in [b for b in spec["budgets"] if b > start]:
        job = Job(id=budget, trial=index, budget=budget, config=config,
                  kind="continue" if (run / "run.json").exists() else "new", start=start)
        with tempfile.TemporaryDirectory() as tmp:
            js = JobSpec(job, str(run), tuple(spec["configs"]), tuple(spec["overrides"]),
                         spec["metric"], spec["seed"], snapshot=str(Path(tmp) / "checkpoint.pt"))
            result = execute(js)
            if result.exit_code:  # found again by run_ray: one message, the right exit code
                raise RuntimeError(f"{_SHARED} {result.exit_code}: {result.error}")
            if result.error:
                raise RuntimeError(result.error)
            (Path(tmp) / "bilevel.json").write_text(json.dumps(
                {"resource": budget, "config": config, "run_dir": str(run)}))
            tune.report({"objective": result.value, "resource": budget,
                         "trial_steps": budget - start},
                        checkpoint=tune.Checkpoint.from_directory(tmp))
        start = budget


def _scheduler(name: str, space: Space, *, n_trials: int, max_resource: int,
               min_resource: int, reduction_factor: int, interval: int,
               seed: int) -> tuple[Any, Any]:
    """Ray's scheduler and searcher for ``name``. Trial ``t`` (Ray numbers trials in the
    order it creates them) starts from initialisation ``t`` (``Space.draw(t, seed)``): every
    trial for random/ASHA, the population for PBT, the first 5 for BO, whose later proposals
    come from TPE seeded by ``seed``."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator

    draws = [space.draw(t, seed=seed) for t in range(n_trials)]
    given = BasicVariantGenerator(points_to_evaluate=draws, random_state=seed)
    if name == "asha":
        return ASHAScheduler(time_attr="resource", max_t=max_resource, grace_period=min_resource,
                             reduction_factor=reduction_factor), given
    if name == "pbt":
        def explore(cfg: dict[str, Any]) -> dict[str, Any]:  # keep values inside the space
            return {k: space[k].clip(v) if k in space else v for k, v in cfg.items()}
        return PopulationBasedTraining(
            time_attr="resource", perturbation_interval=interval, quantile_fraction=0.25,
            resample_probability=0.25, custom_explore_fn=explore,
            hyperparam_mutations={k: p.to_ray() for k, p in space.items()}), given
    if name == "bo":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return FIFOScheduler(), OptunaSearch(points_to_evaluate=draws[:5], sampler=(
            optuna.samplers.TPESampler(seed=seed, n_startup_trials=0)))
    if name == "random":
        return FIFOScheduler(), given
    raise ConfigError(f"--scheduler {name!r}: use asha, pbt, bo or random")


def run_ray(*, space: Space, root: str | Path, configs: Sequence[str], scheduler: str,
            n_trials: int, max_resource: int, overrides: Sequence[str] = (),
            metric: str = "val/loss", seed: int = 0, min_resource: int | None = None,
            reduction_factor: int = 4, interval: int | None = None,
            address: str | None = None, num_cpus: int | None = None, name: str = "tune",
            max_failures: int = 3) -> Any:
    """Run (or, if ``root/name`` holds one, resume) a Ray Tune sweep; returns its ResultGrid.

    Args:
        address: an existing cluster (``ray start --head``); ``None`` starts a local one
            without a dashboard.
        min_resource: ASHA's grace period and the report interval (default ``max/16``).
        interval: PBT's perturbation interval (default: the report interval).
    """
    ray = require_ray()
    from ray import tune

    report = min_resource or max(1, max_resource // 16)
    budgets = sorted({*range(report, max_resource, report), max_resource})
    if scheduler == "pbt" and interval:
        budgets = sorted({*range(interval, max_resource, interval), max_resource})
    root = Path(root).resolve()
    spec = {"root": str(root), "configs": [str(Path(c).resolve()) if Path(c).is_file() else c
                                           for c in configs],
            "overrides": list(overrides), "metric": metric, "seed": seed,
            "keys": list(space), "budgets": budgets}
    if not ray.is_initialized():
        if address is None:
            start_local(num_cpus=num_cpus)
        else:
            connect(address)
    trainable = tune.with_parameters(_trainable, spec=spec)
    path = root / name
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        sched, search = _scheduler(scheduler, space, n_trials=n_trials,
                                   max_resource=max_resource,
                                   min_resource=report, reduction_factor=reduction_factor,
                                   interval=interval or report, seed=seed)
        tuner = tune.Tuner(
            trainable, param_space={k: p.to_ray() for k, p in space.items()},
            tune_config=tune.TuneConfig(metric="objective", mode="min", num_samples=n_trials,
                                        scheduler=sched, search_alg=search),
            run_config=tune.RunConfig(name=name, storage_path=str(root), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=max_failures)))
    grid = tuner.fit()
    stopped = _shared_cause(grid)
    if stopped is not None:
        raise stopped
    return grid



def ray_best(grid: Any, root: Path) -> dict[str, Any] | None:
    """The best trial of a Ray ResultGrid (lowest last ``objective``), as the local engine's
    ``best.json`` entry: ``{"value", "job", "run_dir", "summary"}``."""
    try:
        r = grid.get_best_result(metric="objective", mode="min", scope="last")
    except RuntimeError:  # no trial reported
        return None
    if r.metrics is None or "objective" not in r.metrics:
        return None
    trial_id = str(r.metrics["trial_id"])
    index = _trial_index(trial_id)
    segs = sorted((Path(root) / "runs" / trial_id).glob("seg-*"))
    summary_file = segs[-1] / "summary.json" if segs else None
    summary = (json.loads(summary_file.read_text())
               if summary_file is not None and summary_file.is_file() else {})
    job = Job(id=index, trial=index, budget=int(r.metrics["resource"]),
              config={k: float(v) for k, v in r.config.items()})
    return {"value": float(r.metrics["objective"]), "job": job.to_json(),
            "run_dir": str(segs[-1]) if segs else None, "summary": summary}


__all__ = ["ray_best", "run_ray"]
