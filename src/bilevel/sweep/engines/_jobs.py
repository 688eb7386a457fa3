"""Execute one scheduler :class:`~bilevel.sweep.schedulers.Job` as a bilevel run directory.

Every engine trains trials the same way, through :func:`bilevel.recipes.start` and
:func:`bilevel.recipes.resume` (exactly what ``bilevel run`` / ``bilevel resume`` do):

* ``new``: start the run with the job's config and ``run.max_steps = budget`` (a run
  directory left by a killed attempt is resumed instead);
* ``continue`` (ASHA promotion, PBT survivor): resume the trial's run with a higher
  ``run.max_steps`` (``--allow-config-change`` admits exactly that key);
* ``exploit`` (PBT): write a new run directory whose first checkpoint is the donor's
  snapshot, with the state adopted to the explored config by the recipe's
  ``adopt_state(state, config)``, then resume it.

A resource unit is one unit of ``run.max_steps`` (a weight step for ``onepass``). After each
job the run's newest checkpoint is copied to ``snapshot`` (PBT donors are read from there,
because the donor's own directory moves on and keeps only its last checkpoints).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bilevel.errors import ConfigError, shared_cause_code
from bilevel.sweep.schedulers import Job


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker process needs to run one job (picklable)."""

    job: Job
    path: str
    configs: tuple[str, ...]
    overrides: tuple[str, ...]
    metric: str
    seed: int
    snapshot: str | None = None
    donor_snapshot: str | None = None
    threads: int = 1


@dataclass
class JobResult:
    job_id: int
    value: float
    summary: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    steps: int = 0
    error: str = ""
    exit_code: int = 0  # non-zero: a cause every trial shares (missing data, bad config)


def job_overrides(spec: JobSpec) -> list[str]:
    """The ``--set`` list of a job: shared overrides, searched values, seed, budget."""
    j = spec.job
    return [*spec.overrides, *(f"{k}={float(v)!r}" for k, v in j.config.items()),
            f"run.seed={spec.seed + j.trial}", f"run.max_steps={j.budget}"]


def _finished_at(path: Path, budget: int) -> dict[str, float] | None:
    try:
        info = json.loads((path / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("status") != "finished" or not (path / "summary.json").is_file():
        return None
    if info["config"].get("run", {}).get("max_steps") != budget:
        return None
    return json.loads((path / "summary.json").read_text())


def warm_start(donor_snapshot: Path, path: Path, configs: Sequence[str],
               overrides: Sequence[str], *, adopt: bool = True) -> None:
    """Make ``path`` a run directory of the new config whose only checkpoint is the donor's
    state (adopted to the config unless ``adopt=False``, for a restart of the same trial);
    ``bilevel resume path`` then trains on from it."""
    from bilevel.recipes import get, names, resolve
    from bilevel.run import CheckpointStore, RunDir

    name, config, resolved = resolve(configs, overrides)
    adopter = getattr(get(name), "adopt_state", None)
    if adopter is None and adopt:
        have = [n for n in names() if hasattr(get(n), "adopt_state")]
        raise ConfigError(f"PBT cannot hand a checkpoint of recipe {name!r} a new config: add "
                          f"`adopt_state(state, config)` to its recipe module; recipes that "
                          f"have one: {', '.join(have)}")
    if path.exists():
        shutil.rmtree(path)  # a half-written warm start from a killed attempt
    resolved.pop("recipe")
    run_dir = RunDir.create(path, resolved, recipe=name)
    payload = torch.load(donor_snapshot, weights_only=True)
    state = adopter(payload["state"], config) if adopt and adopter else payload["state"]
    payload.update(state=state, config=run_dir.config,
                   config_hash=run_dir.config_hash, metrics_offset=0)
    CheckpointStore(path / "checkpoints", keep_last=run_dir.checkpointing.keep_last).save(
        payload["step"], payload)


def _snapshot(path: Path, dest: Path) -> None:
    from bilevel.run import CheckpointStore

    found = CheckpointStore(path / "checkpoints").load_latest(report=lambda _m: None)
    if found is None:
        raise ConfigError(f"{path}: the run left no checkpoint to snapshot for PBT")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    torch.save(found[1], tmp)
    tmp.replace(dest)


def execute(spec: JobSpec) -> JobResult:
    """Run one job in this process; errors become a non-finite result with the message."""
    from bilevel.recipes import resume, start

    torch.set_num_threads(spec.threads)
    job, path, t0 = spec.job, Path(spec.path), time.perf_counter()
    steps = job.budget - job.start
    try:
        summary = _finished_at(path, job.budget)
        if summary is None:
            sets = job_overrides(spec)
            if job.kind == "exploit" and not (path / "run.json").is_file():
                warm_start(Path(spec.donor_snapshot or ""), path, spec.configs, sets)
            if (path / "run.json").is_file():
                _, summary = resume(path, [f"run.max_steps={job.budget}"], allow_change=True)
            else:
                if path.exists():
                    shutil.rmtree(path)  # killed while being created
                _, summary = start(list(spec.configs), sets, out=path)
        if spec.snapshot:
            _snapshot(path, Path(spec.snapshot))
    except Exception as exc:  # the sweep records a failed job as diverged and goes on
        return JobResult(job.id, math.nan, {}, time.perf_counter() - t0, steps,
                         f"{type(exc).__name__}: {exc}", shared_cause_code(exc))
    if spec.metric not in summary:
        return JobResult(job.id, math.nan, summary, time.perf_counter() - t0, steps,
                         f"metric {spec.metric!r} not in the run's summary "
                         f"({', '.join(sorted(summary))}); choose one with --metric")
    return JobResult(job.id, float(summary[spec.metric]), dict(summary),
                     time.perf_counter() - t0, steps)

