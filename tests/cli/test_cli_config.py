"""Config errors, layering, round trip and drift through the real CLI (exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.conftest import TINY, run_cli


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BAD = {
    "negative lr": ("inner: {name: sgd, lr: -0.1}", "inner.lr", "greater than 0"),
    "unknown key": ("outer: {name: adam, grad_clipp: 1.0}", "outer.grad_clipp", "did you mean 'grad_clip'"),
    "wrong type": ("data: {name: diabetes, batch_size: lots}", "data.batch_size", "valid integer"),
    "off is not a bool": ("outer: {name: adam, lr: off}", "outer.lr", "'off'"),
    "bad method": ("hypergrad: {method: magic}", "hypergrad.method", "Input should be 'greedy'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_value_exit_2_with_key_and_line(tmp_path: Path, case: str) -> None:
    line, key, allowed = BAD[case]
    cfg = write(tmp_path, f"recipe: toy_hyperlr\nrun: {{max_steps: 5}}\n{line}\n")
    r = run_cli("config", "validate", cfg)
    assert r.code == 2, r
    assert key in r.err and f"{cfg}:3" in r.err and allowed in r.err, r.err


def test_all_errors_reported_together(tmp_path: Path) -> None:
    cfg = write(tmp_path, "recipe: toy_hyperlr\nrun: {max_steps: -1}\n"
                          "inner:\n  lr: -1\n  nme: sgd\n")
    r = run_cli("run", cfg, "--out", tmp_path / "run")
    assert r.code == 2, r
    assert "3 problems" in r.err
    for where in (f"{cfg}:2", f"{cfg}:4", f"{cfg}:5"):
        assert where in r.err
    assert not (tmp_path / "run").exists()


def test_duplicate_keys_named_with_both_lines(tmp_path: Path) -> None:
    cfg = write(tmp_path, "recipe: toy_hyperlr\nrun: {max_steps: 5}\n"
                          "inner:\n  lr: 0.1\n  lr: 0.2\nrun: {seed: 1}\n")
    r = run_cli("config", "validate", cfg)
    assert r.code == 2, r
    assert f"{cfg}:5: duplicate key 'inner.lr' (first given on line 4)" in r.err
    assert f"{cfg}:6: duplicate key 'run'" in r.err


def test_missing_and_unknown_recipe(tmp_path: Path) -> None:
    r = run_cli("config", "validate", write(tmp_path, "run: {max_steps: 5}\n"))
    assert r.code == 2 and "recipe:" in r.err and "toy_hyperlr" in r.err
    cfg = write(tmp_path, "recipe: nope\n", "d.yaml")
    r = run_cli("config", "validate", cfg)
    assert r.code == 2 and f"{cfg}:1" in r.err and "unknown recipe" in r.err


def test_layering_set_and_round_trip(tmp_path: Path, tiny: Path) -> None:
    over = write(tmp_path, "inner:\n  lr: 5e-3\nrun: {seed: 9}\n", "over.yaml")
    r = run_cli("config", "show", tiny, over, "--set", "data.batch_size=8",
                "--set", "model.hidden=[4, 4]")
    assert r.code == 0, r
    shown = write(tmp_path, r.out, "resolved.yaml")
    assert "lr: 0.005" in r.out and "batch_size: 8" in r.out and "seed: 9" in r.out
    again = run_cli("config", "show", shown)
    assert again.code == 0 and again.out == r.out  # the resolved config is a fixed point


def test_run_dir_config_revalidates_to_same_hash(tmp_path: Path, tiny: Path) -> None:
    out = tmp_path / "run"
    r = run_cli("run", tiny, "--out", out, "--set", "run.max_steps=3", "--seed", "5")
    assert r.code == 0, r
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["run"]["seed"] == 5 and info["config"]["run"]["max_steps"] == 3
    from bilevel.recipes import resolve
    from bilevel.run import config_hash

    _, _, resolved = resolve([out / "config.yaml"])
    assert resolved == info["config"] and config_hash(resolved) == info["config_hash"]


def test_changed_config_refused_on_resume(tmp_path: Path, tiny: Path) -> None:
    out = tmp_path / "run"
    assert run_cli("run", tiny, "--out", out, "--set", "run.max_steps=3").code == 0
    text = (out / "config.yaml").read_text().replace("batch_size: 16", "batch_size: 17")
    (out / "config.yaml").write_text(text)
    r = run_cli("resume", out, "--set", "inner.lr=0.5")
    assert r.code == 2, r
    assert "data.batch_size: 16 -> 17" in r.err and "inner.lr: 0.01 -> 0.5" in r.err


def test_configs_lists_and_every_shipped_config_validates() -> None:
    from bilevel.recipes import resolve, shipped_configs

    r = run_cli("configs")
    assert r.code == 0
    shipped = shipped_configs()
    assert shipped and len(r.out.splitlines()) == len(shipped)
    for path in shipped:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# bilevel run "), path
        # the advertised command runs this very file (alone or layered with another)
        assert f"{path.parent.name}/{path.name}" in first, f"{path}: {first}"
        resolve([path])


def test_tiny_config_is_itself_valid() -> None:
    assert TINY.startswith("# bilevel run")


def test_a_reader_that_leaves_early_is_not_an_error() -> None:
    # `bilevel configs | head -1`: a closed pipe ends the listing quietly, exit 0. The read
    # end is closed before the process starts, so its first write always meets it.
    import os
    import subprocess
    import sys

    from tests.cli.conftest import cli_env

    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "bilevel", "configs"], stdout=write,
                              stderr=subprocess.PIPE, env=cli_env(), text=True, check=False)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (0, "")
