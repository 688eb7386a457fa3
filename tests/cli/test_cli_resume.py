"""Exact resume through the real CLI: SIGKILL at chosen points, then ``bilevel resume``.

The interrupted-and-resumed run must end with metrics.jsonl (minus wall-clock times), the
final checkpoint's state and all RNG states identical bit for bit to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.conftest import (
    TINY,
    assert_same_tree,
    cli_env,
    final_state,
    metrics_without_wall,
    run_cli,
)

KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("baseline")
    (root / "tiny.yaml").write_text(TINY)
    r = run_cli("run", root / "tiny.yaml", "--out", root / "run")
    assert r.code == 0, r
    return root / "run"


def assert_same_run(a: Path, b: Path) -> None:
    assert metrics_without_wall(a) == [r for r in metrics_without_wall(b) if "event" not in r]
    assert json.loads((a / "summary.json").read_text()) == json.loads(
        (b / "summary.json").read_text())
    assert_same_tree(final_state(a), final_state(b))


def killed_then_resumed(tiny: Path, out: Path, fault: str) -> None:
    r = run_cli("run", tiny, "--out", out, env=cli_env(BILEVEL_FAULT=fault))
    assert r.code == KILLED, r
    assert (out / "lock").exists()  # left behind by the dead process: stale, taken over
    r = run_cli("resume", out)
    assert r.code == 0, r


# Arrival counts: "inner" is reached twice per step (hypergrad.steps=2), "hyper" and
# "checkpoint_write" once per step / per checkpoint (the first checkpoint is step 0).
_rng = random.Random(1234)
POINTS = [
    f"inner@{_rng.randint(3, 58)}",  # inside the inner loop
    f"hyper@{_rng.choice([7, 12, 23])}",  # after a hyper-step, before its checkpoint
    f"checkpoint_write@{_rng.randint(2, 6)}",  # half-way through writing a checkpoint
    f"after_checkpoint@{_rng.randint(2, 6)}",  # just after a checkpoint
    "inner@1",  # before the first step (only the step-0 checkpoint exists)
]


@pytest.mark.parametrize("fault", POINTS)
def test_sigkill_then_resume_is_bit_identical(baseline: Path, tiny: Path, tmp_path: Path,
                                              fault: str) -> None:
    out = tmp_path / "run"
    killed_then_resumed(tiny, out, fault)
    assert_same_run(baseline, out)
    assert not list((out / "checkpoints").glob(".*tmp*"))
    assert not (out / "lock").exists()


def test_killed_twice_still_identical(baseline: Path, tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_cli("run", tiny, "--out", out, env=cli_env(BILEVEL_FAULT="hyper@9"))
    assert r.code == KILLED, r
    r = run_cli("resume", out, env=cli_env(BILEVEL_FAULT="inner@21"))
    assert r.code == KILLED, r
    assert run_cli("resume", out).code == 0
    assert_same_run(baseline, out)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_checkpoint_falls_back_to_previous(baseline: Path, tiny: Path, tmp_path: Path,
                                                   damage: str) -> None:
    out = tmp_path / "run"
    r = run_cli("run", tiny, "--out", out, env=cli_env(BILEVEL_FAULT="hyper@22"))
    assert r.code == KILLED
    latest = out / "checkpoints" / "step-00000020.pt"
    data = bytearray(latest.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    latest.write_bytes(bytes(data))
    r = run_cli("resume", out)
    assert r.code == 0, r
    assert "step-00000020.pt" in r.err
    assert ("sha256 mismatch" if damage == "flip" else "truncated") in r.err
    events = [m for m in metrics_without_wall(out) if m.get("event") == "checkpoint_skipped"]
    assert len(events) == 1 and "step-00000020.pt" in events[0]["detail"]
    assert_same_run(baseline, out)


def test_no_valid_checkpoint_exits_4(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_cli("run", tiny, "--out", out, env=cli_env(BILEVEL_FAULT="hyper@12")).code == KILLED
    for ckpt in (out / "checkpoints").glob("step-*.pt"):
        ckpt.write_bytes(ckpt.read_bytes()[:100])
    r = run_cli("resume", out)
    assert r.code == 4, r
    assert "no valid checkpoint" in r.err and "truncated" in r.err


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))


def test_full_disk_loses_nothing(baseline: Path, tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_cli("run", tiny, "--out", out, preexec_fn=_limit_file_size)
    assert r.code == 1, r
    assert "could not write checkpoint" in r.err and "Errno 27" in r.err, r
    assert "Traceback" not in r.err
    assert not [p for p in (out / "checkpoints").iterdir()]  # no partial file, no manifest
    r = run_cli("resume", out)
    assert r.code == 0, r
    assert_same_run(baseline, out)


def test_sigint_checkpoints_then_exits_130(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bilevel", "run", str(tiny), "--out", str(out),
           "--set", "run.max_steps=1000000", "--set", "checkpoint.every=100000"]
    proc = subprocess.Popen(cmd, env=cli_env(), stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or metrics.stat().st_size < 2000):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "checkpoint written" in err and "bilevel resume" in err
    manifest = json.loads((out / "checkpoints" / "manifest.json").read_text())
    stopped = manifest["checkpoints"][-1]["step"]
    assert stopped > 0
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    # Continue to a nearby end, and compare with an uninterrupted run of that length.
    end = stopped + 7
    r = run_cli("resume", out, "--set", f"run.max_steps={end}", "--allow-config-change")
    assert r.code == 0, r
    ref = tmp_path / "ref"
    r = run_cli("run", tiny, "--out", ref, "--set", f"run.max_steps={end}",
                "--set", "checkpoint.every=100000")
    assert r.code == 0, r
    assert metrics_without_wall(out) == metrics_without_wall(ref)
    assert_same_tree(final_state(out)["state"], final_state(ref)["state"])
