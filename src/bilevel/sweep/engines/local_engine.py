"""The embedded engine: a scheduler's jobs on a local process pool, over run directories.

Layout of a scheduled sweep (one per algorithm variant)::

    OUT/<variant>/<scheduler>/ledger.jsonl    every job handed out, then its result
    OUT/<variant>/<scheduler>/trial-0003/     a trial's run directory (ASHA promotions
                                              resume it with a higher run.max_steps)
    OUT/<variant>/<scheduler>/trial-0003-j0012/  PBT: the run after an exploit (job 12)
    OUT/<variant>/<scheduler>/snapshots/      PBT: each job's final checkpoint
    OUT/<variant>/<scheduler>/study.journal   BO: the Optuna study

Determinism: up to ``parallel`` jobs run at once, but results are fed back to the
scheduler in *submission* order (a fast job waits for the slower one submitted before it),
so the decisions, and therefore the sweep, depend only on the seed, never on timing.

Resume: running the same sweep again replays the ledger. Each suggested job must match the
recorded one (else the settings changed: refused); a job with a recorded result is not run
again; a job without one (killed) is run, and its run directory resumes from its last
checkpoint. A killed sweep therefore finishes with exactly the result of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bilevel.errors import ConfigError, SweepStoppedError
from bilevel.sweep.engines._jobs import JobResult, JobSpec, execute
from bilevel.sweep.schedulers import AbstractScheduler, Job
from bilevel.sweep.workers import worker_pool


class Ledger:
    """Append-only JSONL record of jobs (``{"job": ...}``) and results (``{"result": ...}``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.jobs: dict[int, dict[str, Any]] = {}
        self.results: dict[int, JobResult] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line from a kill
                if "job" in rec:
                    self.jobs[rec["job"]["id"]] = rec
                else:
                    self.results[rec["result"]["job_id"]] = JobResult(**rec["result"])

    def _append(self, rec: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def submit(self, job: Job, path: str) -> None:
        old = self.jobs.get(job.id)
        if old is not None:
            if old["job"] != json.loads(json.dumps(job.to_json())) or old["path"] != path:
                raise ConfigError(f"{self.path}: job {job.id} differs from the recorded one "
                                  f"({old['job']} vs {job.to_json()}): the sweep's settings "
                                  "changed; use another --out or the original arguments")
            return
        self.jobs[job.id] = {"job": job.to_json(), "path": path}
        self._append(self.jobs[job.id])

    def record(self, result: JobResult) -> None:
        self.results[result.job_id] = result
        self._append({"result": asdict(result)})


def _done(result: JobResult) -> Future[JobResult]:
    fut: Future[JobResult] = Future()
    fut.set_result(result)
    return fut


def trial_path(root: Path, job: Job) -> Path:
    """``trial-0003`` for the trial's first run; ``trial-0003-j0012`` after a PBT exploit."""
    return root / (f"trial-{job.trial:04d}" + (f"-j{job.id:04d}" if job.kind == "exploit" else ""))


def run_scheduler(scheduler: AbstractScheduler, *, root: str | Path, configs: Sequence[str],
                  overrides: Sequence[str] = (), metric: str = "val/loss", seed: int = 0,
                  parallel: int = 1, snapshots: bool = False,
                  on_result: Callable[[Job, JobResult], None] | None = None) -> Ledger:
    """Drive ``scheduler`` to completion; returns the ledger (every job and result).

    Args:
        root: the sweep directory of this (variant, scheduler).
        configs, overrides: what every trial layers (the searched keys come on top).
        metric: the summary key minimised (NaN/inf, i.e. diverged or failed, rank last).
        seed: trial ``t`` runs with ``run.seed = seed + t``.
        snapshots: keep each job's final checkpoint (PBT needs them).
    """
    root = Path(root)
    ledger = Ledger(root / "ledger.jsonl")
    paths: dict[int, Path] = {}
    inflight: deque[tuple[Job, Future[JobResult]]] = deque()
    pool = worker_pool(parallel) if parallel > 1 else None  # workers die with this process
    try:
        while True:
            while len(inflight) < max(1, parallel) and (job := scheduler.suggest()) is not None:
                path = paths[job.trial] if job.kind == "continue" else trial_path(root, job)
                paths[job.trial] = path
                ledger.submit(job, str(path))
                spec = JobSpec(job, str(path), tuple(configs), tuple(overrides), metric, seed,
                               snapshot=str(root / "snapshots" / f"job-{job.id:04d}.pt")
                               if snapshots else None,
                               donor_snapshot=str(root / "snapshots" /
                                                  f"job-{job.info['donor_job']:04d}.pt")
                               if job.kind == "exploit" else None)
                if job.id in ledger.results:
                    fut = _done(ledger.results[job.id])
                elif pool is None:
                    fut = _done(execute(spec))
                else:
                    fut = pool.submit(execute, spec)
                inflight.append((job, fut))
            if not inflight:
                return ledger
            job, fut = inflight.popleft()
            result = fut.result()  # BrokenProcessPool (a worker was killed) propagates
            if result.exit_code:  # not recorded: the same command reruns it once fixed
                raise SweepStoppedError(
                    f"trial {job.trial} (job {job.id}) could not start, and every other trial "
                    f"would fail the same way, so the sweep stopped: {result.error}\nFix this "
                    "and run the same command again: finished jobs are kept.",
                    exit_code=result.exit_code)
            if job.id not in ledger.results:
                ledger.record(result)
            scheduler.report(job, result.value)
            if on_result:
                on_result(job, result)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def best(ledger: Ledger) -> tuple[dict[str, Any], JobResult] | None:
    """The finished job with the lowest value at the largest budget reached: (job, result)."""
    done = [(ledger.jobs[i], r) for i, r in ledger.results.items() if math.isfinite(r.value)]
    if not done:
        return None
    top = max(rec["job"]["budget"] for rec, _ in done)
    return min(((rec, r) for rec, r in done if rec["job"]["budget"] == top),
               key=lambda x: (x[1].value, x[0]["job"]["id"]))


def totals(ledger: Ledger) -> dict[str, float]:
    """Compute spent: trial-steps (resource units actually trained) and summed job seconds."""
    rs = ledger.results.values()
    return {"jobs": float(len(ledger.results)), "trial_steps": float(sum(r.steps for r in rs)),
            "seconds": float(sum(r.seconds for r in rs))}
