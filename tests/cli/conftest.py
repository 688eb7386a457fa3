"""Helpers for CLI tests: the real ``bilevel`` command in a subprocess, on tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

TINY = """\
# bilevel run tiny.yaml
recipe: toy_hyperlr
data: {name: diabetes, batch_size: 16}
model: {name: mlp, hidden: [8], activation: tanh, dropout: 0.2}
inner: {name: sgd, lr: 1e-2}
outer: {name: adam, lr: 0.05}
hypergrad: {method: greedy, steps: 2}
run: {seed: 3, max_steps: 30, nan_policy: skip}
logging: {every: 1, tensorboard: false}
checkpoint: {every: 5, keep_last: 3}
"""


class Result:
    """A finished ``bilevel`` process."""

    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def cli_env(*, fault: str | None = None, **extra: str) -> dict[str, str]:
    """The test environment of a ``bilevel`` subprocess: one thread, no inherited fault
    injection unless ``fault`` (a ``BILEVEL_FAULT`` point, e.g. ``"inner@37"``) is given."""
    env = {k: v for k, v in os.environ.items() if k != "BILEVEL_FAULT"}
    if fault:
        env["BILEVEL_FAULT"] = fault
    env.update(CI="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::DeprecationWarning")
    env.update(extra)
    return env


def run_cli(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None,
            preexec_fn: Callable[[], None] | None = None, timeout: float = 120,
            fault: str | None = None) -> Result:
    """``python -m bilevel ARGS`` in a subprocess: the one CLI helper of the test suite."""
    cmd = [sys.executable, "-m", "bilevel", *map(str, args)]
    proc = subprocess.run(cmd, env=env or cli_env(fault=fault), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn, check=False)
    return Result(proc)


@pytest.fixture
def bilevel() -> Callable[..., Result]:
    return run_cli


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def metrics_without_wall(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "wall"} for line in lines]


def final_state(run_dir: Path) -> dict[str, Any]:
    manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    last = manifest["checkpoints"][-1]
    payload = torch.load(run_dir / "checkpoints" / last["file"], weights_only=True)
    return {"step": last["step"], "state": payload["state"], "rng": payload["rng"]}


def assert_same_tree(a: Any, b: Any, path: str = "") -> None:
    """Bit-for-bit equality of nested dicts/lists/tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, path
        assert torch.equal(a, b), f"tensors differ at {path}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"keys differ at {path}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"length differs at {path}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{path}.{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
