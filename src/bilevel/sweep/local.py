"""The ``local`` engine: run a plan's trials in a pool of worker processes, resumably.

Each trial is a run directory. Before launching, a trial's directory decides what happens:

* ``run.json`` with status ``finished`` and a ``summary.json``: skipped (never redone);
* any other existing run directory (killed, interrupted, failed): ``bilevel resume``'d from
  its last valid checkpoint (a run killed before its first checkpoint starts again);
* a directory without ``run.json`` (killed while being created): removed and started.

With ``parallel=1`` the trials run one after another in the calling process (no start-up
cost; a crash kills the sweep itself, and running it again continues). Otherwise workers are
``spawn``-ed processes (no fork of a parent holding threads); each runs one trial at a time through :func:`bilevel.recipes.start` / :func:`bilevel.recipes.resume`, exactly
like ``bilevel run``. A trial that raises is recorded as failed and the sweep goes on, except
for a cause that every trial shares (missing or corrupted data, an invalid config: exit codes
3 and 2): then no further trial starts and :class:`~bilevel.errors.SweepStoppedError` carries
that one message and exit code. A worker that dies (SIGKILL, out of memory) stops the sweep,
and running it again continues.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path

from bilevel.errors import SweepStoppedError, shared_cause_code
from bilevel.sweep.plan import Trial
from bilevel.sweep.workers import worker_pool


@dataclass(frozen=True)
class TrialResult:
    """What happened to one trial: ``skipped``, ``finished`` or ``failed`` (+ error)."""

    trial: Trial
    outcome: str
    summary: dict[str, float]
    seconds: float = 0.0
    error: str = ""
    exit_code: int = 0  # non-zero: a cause every trial shares (see the module docstring)


def status(path: str | Path) -> str:
    """``new``, ``finished`` or the run's recorded status (``running`` after a kill)."""
    p = Path(path)
    if not (p / "run.json").is_file():
        return "new"
    info = json.loads((p / "run.json").read_text())
    if info.get("status") == "finished" and (p / "summary.json").is_file():
        return "finished"
    return str(info.get("status", "unknown"))


def run_trial(trial: Trial, threads: int = 1) -> TrialResult:
    """Start, resume or skip one trial (in the calling process)."""
    import torch

    from bilevel.recipes import resume, start

    torch.set_num_threads(threads)
    path, t0 = Path(trial.path), time.perf_counter()
    state = status(path)
    if state == "finished":
        return TrialResult(trial, "skipped", json.loads((path / "summary.json").read_text()))
    try:
        if state == "new":
            if path.exists():
                shutil.rmtree(path)
            _, summary = start(list(trial.configs), list(trial.overrides), out=path)
        else:
            _, summary = resume(path)
    except Exception as exc:  # the sweep records it and continues
        if code := shared_cause_code(exc):  # no traceback: the message says what to do
            return TrialResult(trial, "failed", {}, time.perf_counter() - t0, str(exc), code)
        return TrialResult(trial, "failed", {}, time.perf_counter() - t0,
                           f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
    return TrialResult(trial, "finished", summary, time.perf_counter() - t0)


def stop_for(r: TrialResult) -> SweepStoppedError:
    """The error that ends a sweep whose trial ``r`` failed for a shared cause."""
    return SweepStoppedError(
        f"trial {r.trial.variant}/init-{r.trial.index:04d} could not start, and every other "
        f"trial would fail the same way, so the sweep stopped: {r.error}\nFix this and run the "
        "same command again: finished trials are kept.", exit_code=r.exit_code)


def run_local(trials: Sequence[Trial], *, parallel: int = 1,
              on_result: Callable[[TrialResult], None] | None = None) -> list[TrialResult]:
    """Run ``trials`` on ``parallel`` worker processes; finished ones are skipped here,
    without starting a worker. Results come back in completion order."""
    results = []
    todo = []
    for t in trials:
        if status(t.path) == "finished":
            r = TrialResult(t, "skipped", json.loads((Path(t.path) / "summary.json").read_text()))
            results.append(r)
            if on_result:
                on_result(r)
        else:
            todo.append(t)
    if not todo:
        return results
    if parallel <= 1:
        for t in todo:
            r = run_trial(t)
            if r.exit_code:
                raise stop_for(r)
            results.append(r)
            if on_result:
                on_result(r)
        return results
    with worker_pool(parallel) as pool:  # workers die with this process (sweep/workers.py)
        futures = [pool.submit(run_trial, t) for t in todo]
        for f in as_completed(futures):
            r = f.result()  # BrokenProcessPool propagates: a worker died
            if r.exit_code:
                for other in futures:  # trials not yet started never start
                    other.cancel()
                raise stop_for(r)
            results.append(r)
            if on_result:
                on_result(r)
    return results
