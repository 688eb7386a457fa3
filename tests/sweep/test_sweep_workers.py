"""Issue 16, item 5: the workers of a ``--parallel`` sweep die with a killed sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bilevel.run import RunLock
from bilevel.run.lock import pid_alive
from tests.cli.conftest import TINY, cli_env

SWEEP = """
import sys
from bilevel.sweep.local import run_local
from bilevel.sweep.plan import Trial
root = sys.argv[1]
sets = ("run.max_steps=1000000", "checkpoint.every=1")
trials = [Trial("v", i, (f"{root}/tiny.yaml",), sets, f"{root}/t{i}") for i in range(2)]
run_local(trials, parallel=2)
"""


def _holder(run: Path) -> int | None:
    try:
        pid = json.loads((run / "lock").read_text()).get("pid")
    except (OSError, ValueError):
        return None
    return pid if isinstance(pid, int) else None


def test_killed_parallel_sweep_takes_its_workers_along(tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text(TINY)
    sweep = subprocess.Popen([sys.executable, "-c", SWEEP, str(tmp_path)], env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = [tmp_path / "t0", tmp_path / "t1"]
    workers: list[int | None] = [None, None]
    deadline = time.time() + 120
    while time.time() < deadline and not all(workers):
        workers = [_holder(r) for r in runs]
        time.sleep(0.2)
    assert all(workers) and sweep.pid not in workers, workers
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(pid_alive(p) for p in workers if p):
        time.sleep(0.2)
    assert not any(pid_alive(p) for p in workers if p), "workers outlived the sweep"
    for run in runs:  # stopped through SIGTERM: checkpointed, marked, lock free at once
        assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
        with RunLock(run / "lock"):
            pass
