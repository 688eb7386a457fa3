"""The auxilearn recipe on scikit-learn's digits (offline): the linear combiner end to end
through the real CLI (run, resume), the other methods in-process through the same registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bilevel.errors import ConfigError
from bilevel.recipes import _registry

TINY = """\
# bilevel run tiny.yaml
recipe: auxilearn
method: {method}
data: {{name: digits, batch_size: 16}}
tasks: {{labels_per_class: 6, auxiliary: [parity, rotation, noise], val_size: 100}}
model: {{name: mlp, hidden: [32]}}
inner: {{name: momentum, lr: 0.05, momentum: 0.9}}
meta: {{aux_per_class: 2, every: 2, batch_size: 16, lr: 0.05, hpo_lr: 0.05,
        combiner_hidden: [4]}}
eval_every: 10
run: {{seed: 1, max_steps: 30}}
logging: {{every: 5, tensorboard: false, progress: false}}
checkpoint: {{every: 10}}
"""


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    env.pop("BILEVEL_FAULT", None)
    return subprocess.run([sys.executable, "-m", "bilevel", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def tiny(tmp_path: Path, method: str) -> Path:
    path = tmp_path / f"{method}.yaml"
    path.write_text(TINY.format(method=method))
    return path


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("auxilearn")
    config, out = tiny(tmp, "linear"), tmp / "full"
    proc = cli("run", config, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return config, out


def check_run(out: Path, method: str) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["test/acc_at_best_val"] <= 1.0 and summary["val/acc"] > 0.1
    logged = [r for r in records(out) if "weight/noise" in r]
    assert [r["step"] for r in logged] == [5, 10, 15, 20, 25, 30]
    noise = [r["weight/noise"] for r in logged]
    if method == "stl":
        assert noise == [0.0] * 6 and all(r["weight/main"] == 1.0 for r in logged)
    elif method == "equal":
        assert noise == [1.0] * 6
    else:  # learned and monotone: weights move, and never go negative
        assert len(set(noise)) > 1
        assert all(r[k] >= 0 for r in logged for k in r if k.startswith("weight/"))
        metas = [r for r in records(out) if "meta/grad_norm" in r]
        assert len(metas) == 15 and all(r["meta/grad_norm"] >= 0 for r in metas)


def test_linear_through_the_cli(linear_run: tuple[Path, Path]) -> None:
    check_run(linear_run[1], "linear")


@pytest.mark.parametrize("method", ["stl", "equal", "nonlinear"])
def test_other_methods(tmp_path: Path, method: str) -> None:
    _registry.start([tiny(tmp_path, method)], out=tmp_path / "run")
    check_run(tmp_path / "run", method)


def test_resume_is_exact(tmp_path: Path, linear_run: tuple[Path, Path]) -> None:
    """Stop at step 10 (a checkpoint), resume to 30: the same metrics as one 30-step run."""
    config, full = linear_run
    part = tmp_path / "part"
    proc = cli("run", config, "--out", part, "--set", "run.max_steps=10")
    assert proc.returncode == 0, proc.stderr
    proc = cli("resume", part, "--allow-config-change", "--set", "run.max_steps=30")
    assert proc.returncode == 0, proc.stderr

    def strip(rs: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "wall"} for r in rs if "event" not in r]

    assert strip(records(part)) == strip(records(full))
    assert (json.loads((part / "summary.json").read_text())
            == json.loads((full / "summary.json").read_text()))


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    config = tiny(tmp_path, "linear")
    with pytest.raises(ConfigError, match=r"meta.aux_per_class \(6\) must be below "
                                          r"tasks.labels_per_class \(6\)"):
        _registry.resolve([config], ["meta.aux_per_class=6"])
    with pytest.raises(ConfigError, match=r"tasks\.auxiliary"):
        _registry.resolve([config], ["tasks.auxiliary=[parity,colour]"])
