"""Ray Tune engine (slow: a Ray instance costs ~20 s to start; run these one at a time).

ASHA over run directories with bilevel checkpoints inside Ray checkpoints, trial t from
initialisation t, best.json, and a resume of the finished experiment; a local instance that
listens only on loopback and leaves no process behind when its driver is killed; joining a
head started with token authentication, and failing fast on an unreachable one. Loopback
addresses only."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bilevel.data import fetch_dataset
from bilevel.recipes.onepass.recipe import SEARCH_SPACE
from bilevel.sweep.scheduled import scheduled_sweep
from bilevel.sweep.schedulers import Space
from tests.conftest import shared_data_dir
from tests.sweep._procs import cmdline, descendants, is_loopback, listening, still_alive

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="Ray Tune is optional: pip install 'bilevel[ray]'")
tune = pytest.importorskip("ray.tune")

SEARCH = ["inner.lr", "inner.weight_decay", "inner.momentum"]
CLI = [sys.executable, "-m", "bilevel", "sweep", "onepass/uci_energy.yaml",
       "-a", "onepass/random_validation.yaml", "--engine", "ray", "--scheduler", "asha",
       "--search", ",".join(SEARCH), "--set", "logging.progress=false"]


@pytest.fixture
def uci(tmp_path, monkeypatch):
    fetch_dataset("uci_energy", tmp_path / "data", from_dir=shared_data_dir())
    monkeypatch.setenv("BILEVEL_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)


def _sockets(pid: int) -> list[str]:
    return [a for addrs in listening([pid, *descendants(pid)]).values() for a in addrs]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_asha_reports_and_checkpoints_through_bilevel(tmp_path, uci, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    kw = {"scheduler": "asha", "engine": "ray", "out": tmp_path / "r", "trials": 3,
          "max_resource": 40, "min_resource": 10, "reduction_factor": 2, "parallel": 2,
          "overrides": ["logging.progress=false"], "search": SEARCH, "seed": 5}
    try:
        report = scheduled_sweep(["onepass/uci_energy.yaml"], ["onepass/random_validation.yaml"],
                                 **kw)
        addrs = _sockets(os.getpid())  # the instance is still up: it listens on loopback only
        assert addrs and all(is_loopback(a) for a in addrs), addrs
        best = report["random_validation"]["best"]
        assert 0 < best["value"] < 2 and set(best["job"]["config"]) == set(SEARCH)
        root = tmp_path / "r/random_validation/asha"
        assert json.loads((root / "best.json").read_text())["best"]["value"] == best["value"]
        assert "bilevel run" in best["replay"] and best["summary"]["val/loss"] == best["value"]
        runs = sorted(Path(root, "runs").glob("*/seg-000/run.json"))
        assert len(runs) == 3  # one bilevel run directory per Ray trial
        space = Space.from_dict({k: SEARCH_SPACE[k] for k in SEARCH})
        for run in runs:  # trial t starts from initialisation t, run.seed = seed + t
            cfg = json.loads(run.read_text())["config"]
            t = cfg["run"]["seed"] - 5
            assert {k: cfg["inner"][k.split(".")[1]] for k in SEARCH} == pytest.approx(
                space.draw(t, seed=5))
        assert tune.Tuner.can_restore(str(root / "tune"))
        # Running the same command again restores the finished experiment (Tuner.restore).
        again = scheduled_sweep(["onepass/uci_energy.yaml"], ["onepass/random_validation.yaml"],
                                **kw)
        assert again["random_validation"]["best"]["value"] == best["value"]
    finally:
        ray.shutdown()


def test_a_killed_ray_driver_listened_on_loopback_only_and_leaves_no_process(tmp_path, uci):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    log = tmp_path / "driver.log"
    with open(log, "w") as f:
        driver = subprocess.Popen([*CLI, "--trials", "2", "--max-resource", "2000",
                                   "--min-resource", "2000", "--parallel", "1", "--out", "k"],
                                  env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not list(Path("k").glob("random_validation/asha/runs/*/seg-000/run.json")):
            assert driver.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "no Ray trial started within 240 s"
            time.sleep(0.5)
        time.sleep(2)
        seen = descendants(driver.pid)
        names = " ".join(cmdline(p) for p in seen)
        assert "raylet" in names and "ray::" in names, names  # the instance is up
        addrs = _sockets(driver.pid)
        assert addrs and all(is_loopback(a) for a in addrs), addrs
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        deadline = time.monotonic() + 20
        while (alive := still_alive(seen)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive, [(p, cmdline(p)) for p in alive]
    finally:
        if driver.poll() is None:
            driver.kill()


def test_joining_a_head_with_token_auth_on_loopback_and_failing_fast(tmp_path, uci):
    token = secrets.token_hex(32)
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token}
    # Documented head on one machine: loopback only, token authentication on.
    head = subprocess.Popen(
        [shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray", "start",
         "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
        env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, str] = {}
    try:
        args = ["--trials", "2", "--max-resource", "20", "--min-resource", "10",
                "--ray-address", f"127.0.0.1:{port}"]
        ok = subprocess.run([*CLI, *args, "--out", "j"], env=env, capture_output=True,
                            text=True, timeout=300)
        seen = descendants(head.pid)
        assert ok.returncode == 0, ok.stderr[-3000:]
        assert "random_validation: best val/loss =" in ok.stdout
        addrs = _sockets(head.pid)
        assert addrs and all(is_loopback(a) for a in addrs), addrs
        # A wrong token: a clear error (exit 2) instead of a hang.
        bad = subprocess.run([*CLI, *args, "--out", "b"], env={**env, "RAY_AUTH_TOKEN": "0" * 64},
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "Ray refused to connect" in bad.stderr, bad.stderr[-2000:]
        assert "Traceback" not in bad.stderr
    finally:
        seen.update(descendants(head.pid))
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        time.sleep(2)
        for pid in still_alive(seen):  # what the head started and did not stop
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
    # Nothing listens there any more: an unreachable address fails within seconds.
    t0 = time.monotonic()
    gone = subprocess.run([*CLI, *args, "--out", "g"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert gone.returncode == 2 and "cannot reach a Ray head" in gone.stderr, gone.stderr[-2000:]
    assert time.monotonic() - t0 < 60 and "Traceback" not in gone.stderr


def test_a_cause_every_trial_shares_ends_a_ray_sweep_with_its_exit_code(tmp_path, monkeypatch):
    from bilevel.errors import SweepStoppedError

    monkeypatch.setenv("BILEVEL_DATA", str(tmp_path / "empty-data"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    try:
        with pytest.raises(SweepStoppedError, match="bilevel data fetch uci_energy") as info:
            scheduled_sweep(["onepass/uci_energy.yaml"], ["onepass/random_validation.yaml"],
                            scheduler="asha", engine="ray", out=tmp_path / "r", trials=1,
                            max_resource=10, min_resource=10, parallel=1, search=SEARCH,
                            overrides=["logging.progress=false"])
        assert info.value.exit_code == 3
    finally:
        ray.shutdown()
