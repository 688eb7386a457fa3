"""Checkpoints (atomic, verified, weights-only, keep-last, full disk) and the run lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bilevel.errors import CheckpointError
from bilevel.run import CheckpointStore, RunLock, RunLockedError, capture_rng, restore_rng


def test_keep_last_and_roundtrip(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in (5, 10, 15):
        store.save(step, {"w": torch.full((3,), float(step)), "step": step})
    assert [e.step for e in store.entries()] == [10, 15]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000010.pt",
                                                               "step-00000015.pt"]
    entry, payload = store.load_latest()
    assert entry.step == 15 and torch.equal(payload["w"], torch.full((3,), 15.0))


def test_flipped_byte_detected_and_previous_used(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=3)
    store.save(1, {"w": torch.arange(1000.0)})
    store.save(2, {"w": torch.arange(1000.0) + 1})
    path = tmp_path / "step-00000002.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # inside the tensor payload: torch.load alone would not notice
    path.write_bytes(bytes(data))
    skipped: list[str] = []
    entry, _ = store.load_latest(report=skipped.append)
    assert entry.step == 1 and "sha256 mismatch" in skipped[0] and "step-00000002.pt" in skipped[0]


def test_none_valid_raises_and_none_written_returns_none(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    assert store.load_latest() is None
    store.save(1, {"w": torch.ones(2)})
    (tmp_path / "step-00000001.pt").unlink()
    with pytest.raises(CheckpointError, match="no valid checkpoint") as info:
        store.load_latest(report=lambda _: None)
    assert info.value.exit_code == 4


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("force_env", [False, True])
def test_malicious_checkpoint_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      force_env: bool) -> None:
    if force_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    store = CheckpointStore(tmp_path)
    store.save(1, {"w": torch.ones(1)})
    marker = tmp_path / "pwned"
    evil = tmp_path / "step-00000001.pt"
    torch.save({"x": _Payload(marker)}, evil)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    import hashlib

    manifest["checkpoints"][0].update(sha256=hashlib.sha256(evil.read_bytes()).hexdigest(),
                                      bytes=evil.stat().st_size)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="weights_only"):
        store.load(store.entries()[0])
    assert not marker.exists()


FULL_DISK = """
import resource, signal, sys, torch
from bilevel.run import CheckpointStore, CheckpointWriteError
store = CheckpointStore(__import__("pathlib").Path(sys.argv[1]))
store.save(1, {"w": torch.zeros(10)})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
try:
    store.save(2, {"w": torch.zeros(100000)})
except CheckpointWriteError as exc:
    print(exc)
"""


def test_full_disk_keeps_previous_checkpoint(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True,
                          text=True, timeout=60, check=True)
    assert "could not write checkpoint" in proc.stdout and "Errno 27" in proc.stdout
    assert str(tmp_path / "step-00000002.pt") in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "step-00000001.pt"]
    entry, payload = CheckpointStore(tmp_path).load_latest()
    assert entry.step == 1 and torch.equal(payload["w"], torch.zeros(10))


def test_rng_state_roundtrips_through_weights_only(tmp_path: Path) -> None:
    import random

    import numpy as np

    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all()
    assert expected[2] == again[2]


def test_lock_refuses_live_and_takes_over_stale(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    with RunLock(path, heartbeat_s=0.05):
        with pytest.raises(RunLockedError, match=str(os.getpid())):
            RunLock(path).acquire()
        before = path.stat().st_mtime
        time.sleep(0.2)
        assert path.stat().st_mtime > before  # the heartbeat touches it
    assert not path.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with RunLock(path):  # dead holder: taken over
        assert json.loads(path.read_text())["pid"] == os.getpid()
    path.write_text(json.dumps({"pid": os.getppid(), "host": "elsewhere"}))
    old = time.time() - 3600
    os.utime(path, (old, old))
    with RunLock(path, stale_after_s=30):  # live pid elsewhere, but no heartbeat for an hour
        pass
