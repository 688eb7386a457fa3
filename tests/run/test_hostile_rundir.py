"""Second reliability audit (issue 16), run layer: each test failed before its fix.

Run directories are driven in-process through the RunDir API with a stand-in "recipe" (a
tensor and a step counter), which is all the run layer sees of a recipe.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from bilevel.errors import CheckpointError, ConfigError
from bilevel.run import RunDir, RunLock, RunLockedError, changed_keys, on_nonfinite, read_metrics
from bilevel.run.safeio import RunFileError
from bilevel.run.signals import StopNow

CONFIG: dict[str, Any] = {
    "logging": {"tensorboard": False, "progress": False},
    "checkpoint": {"every": 5, "keep_last": 5},
    "run": {"max_steps": 20},
}


def train(run_dir: RunDir, stop: int, *, start: int | None = None) -> int:
    """The stand-in recipe: restore, then log and checkpoint each step up to ``stop``."""
    ckpt = run_dir.restore()
    w = ckpt.state["w"] if ckpt else torch.zeros(3)
    begin = ckpt.step if ckpt else 0
    for step in run_dir.steps(begin if start is None else start, stop):
        w = w + torch.rand(3)
        run_dir.log(step, {"w0": float(w[0])})
        run_dir.checkpoint(step, {"w": w})
    return begin


def make_run(path: Path, steps: int = 12, config: dict[str, Any] | None = None) -> RunDir:
    run_dir = RunDir.create(path, config or CONFIG, recipe="stand_in")
    with run_dir:
        train(run_dir, steps)
    return run_dir


# -- item 3: a truncated metrics.jsonl is repaired on resume, not appended to -------------

def test_truncated_metrics_cut_to_last_line_and_reported(tmp_path: Path) -> None:
    make_run(tmp_path / "r", steps=12)  # checkpoints at 5 and 10; metrics up to step 12
    metrics = tmp_path / "r" / "metrics.jsonl"
    text = metrics.read_text()
    cut = text.index('"step": 8') + 5  # inside the record of step 8, before the checkpoint
    metrics.write_text(text[:cut])
    run_dir = RunDir.open(tmp_path / "r")
    with run_dir:
        assert train(run_dir, 14) == 10
    records = read_metrics(metrics)  # no corrupt line: a torn line was not appended to
    steps = [r["step"] for r in records if "event" not in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 14]
    lost = [r for r in records if r.get("event") == "metrics_lost"]
    assert len(lost) == 1 and "after step 7" in lost[0]["detail"]


# -- item 4: a deleted manifest is rebuilt from the step files -----------------------------

def test_deleted_manifest_recovered_from_verified_step_files(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    make_run(tmp_path / "r", steps=15)  # checkpoints 5, 10, 15
    ckpts = tmp_path / "r" / "checkpoints"
    (ckpts / "manifest.json").unlink()
    (ckpts / "step-00000015.pt").write_bytes(b"not a checkpoint")  # rejected, not loaded
    run_dir = RunDir.open(tmp_path / "r")
    with run_dir:
        assert train(run_dir, 16) == 10  # not 0: the metrics survive
    err = capsys.readouterr().err
    assert "manifest.json is missing: rebuilt it from 2 step file(s)" in err
    assert "step-00000015.pt" in err
    steps = [r["step"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "event" not in r]
    assert steps == list(range(1, 17))


# -- item 6: NaN in a config does not make the run unresumable -----------------------------

def test_nan_in_config_still_equal_on_resume_and_rollback(tmp_path: Path) -> None:
    assert changed_keys({"a": {"b": math.nan, "c": [1.0, math.nan]}},
                        {"a": {"b": math.nan, "c": [1.0, math.nan]}}) == []
    assert changed_keys({"a": math.nan}, {"a": 1.0}) == ["a: nan -> 1.0"]
    config = {**CONFIG, "extra": {"threshold": math.nan}}
    make_run(tmp_path / "r", steps=7, config=config)
    run_dir = RunDir.open(tmp_path / "r")
    run_dir.update_config(run_dir.config)  # what resume does: no change
    with run_dir:
        assert train(run_dir, 8) == 5  # restore() compares against the checkpoint's config


# -- item 8: atomic create; no symlink followed --------------------------------------------

def _create(path: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        RunDir.create(path, CONFIG, recipe="stand_in")
        results.put("ok")
    except ConfigError:
        results.put("refused")


def test_create_is_atomic_between_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for i in range(20):
        path = tmp_path / f"r{i}"
        if i % 2:
            path.mkdir()  # an existing empty directory is claimed too
        barrier, results = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_create, args=(str(path), barrier, results))
                 for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        outcomes = sorted(results.get(timeout=5) for _ in procs)
        assert outcomes == ["ok", "refused", "refused"], (i, outcomes)


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.yaml", "run.json", "lock"])
def test_symlinked_run_file_is_not_followed(tmp_path: Path, name: str) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run_dir = RunDir.create(tmp_path / "r", CONFIG, recipe="stand_in")
    link = tmp_path / "r" / name
    link.unlink(missing_ok=True)
    link.symlink_to(victim)
    try:
        with run_dir:
            run_dir.log(1, {"x": 1.0})
            run_dir.finish({"x": 1.0})
    except (RunFileError, RunLockedError) as exc:
        assert "symbolic link" in str(exc)
    assert victim.read_text() == "precious\n"


# -- item 9: leftovers ----------------------------------------------------------------------

def test_lowering_max_steps_below_the_checkpoint_is_refused(tmp_path: Path) -> None:
    make_run(tmp_path / "r", steps=12)
    run_dir = RunDir.open(tmp_path / "r")
    with pytest.raises(ConfigError, match="checkpoint is at step 10, past its last step 6"), \
            run_dir:
        train(run_dir, 6)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "failed"


def test_checkpoint_without_rng_falls_back_to_previous(tmp_path: Path) -> None:
    make_run(tmp_path / "r", steps=12)
    ckpts = tmp_path / "r" / "checkpoints"
    path = ckpts / "step-00000010.pt"
    payload = torch.load(path, weights_only=True)
    del payload["rng"]
    torch.save(payload, path)
    manifest = json.loads((ckpts / "manifest.json").read_text())
    manifest["checkpoints"][-1].update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                                       bytes=path.stat().st_size)
    (ckpts / "manifest.json").write_text(json.dumps(manifest))
    run_dir = RunDir.open(tmp_path / "r")
    with run_dir:
        assert train(run_dir, 12) == 5
    skipped = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl")
               if r.get("event") == "checkpoint_skipped"]
    assert "missing: rng" in skipped[0]["detail"]


def test_double_ctrl_c_is_recorded_interrupted(tmp_path: Path) -> None:
    run_dir = RunDir.create(tmp_path / "r", CONFIG, recipe="stand_in")
    with pytest.raises(StopNow) as info, run_dir:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert run_dir.stop_requested
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert info.value.exit_code == 130
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "interrupted"
    assert not (tmp_path / "r" / "lock").exists()


def test_nan_abort_hint_names_only_other_policies() -> None:
    class Sink:
        def event(self, step: int, kind: str, **info: Any) -> None:
            pass

    with pytest.raises(Exception, match=r"set run\.nan_policy to skip") as e:
        on_nonfinite(Sink(), "rollback", step=3, what="hypergradient", rollbacks=5)
    assert "skip/rollback" not in str(e.value)
    with pytest.raises(Exception, match=r"to skip/rollback"):
        on_nonfinite(Sink(), "abort", step=3, what="hypergradient")


HOLD = """
import sys, time
from pathlib import Path
from bilevel.run import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_stale_lock_taken_over_at_once_without_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    path.write_bytes(b"")  # disk full at creation: a 0-byte lock
    t0 = time.monotonic()
    with RunLock(path):
        pass
    # A fresh lock naming a live process (a recycled pid) but held by no one.
    import socket

    path.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with RunLock(path):
        pass
    # A holder killed with SIGKILL: its flock is gone with it.
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=f"process {holder.pid} on"):
        RunLock(path).acquire()
    holder.kill()
    holder.wait()
    holder.stdout.close()
    with RunLock(path):
        pass
    assert time.monotonic() - t0 < 20
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock.stale files


def test_checkpoint_payload_check_rejects_incomplete(tmp_path: Path) -> None:
    run_dir = RunDir.create(tmp_path / "r", CONFIG, recipe="stand_in")
    with pytest.raises(CheckpointError, match="missing: rng"):
        run_dir._check_payload({"format": 1, "state": {}, "metrics_offset": 0, "wall": 0.0,
                                "config": {}})
