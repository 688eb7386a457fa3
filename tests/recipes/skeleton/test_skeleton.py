"""The skeleton recipe folder: it learns in the right direction, resumes exactly, and a copy of
the folder under a new name is a new recipe with no edit anywhere else (issue 18)."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

import bilevel.recipes as recipes
from bilevel.cli import main
from bilevel.errors import ConfigError
from bilevel.recipes import _registry, resume, start
from tests.cli.conftest import assert_same_tree, final_state, run_cli

SKELETON = Path(recipes.__file__).parent / "skeleton"
FAST = ["run.max_steps=30", "outer.lr=0.2"]


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    """Forget discovered folders before and after a test that changes what can be found."""
    _registry.packages.cache_clear()
    yield
    _registry.packages.cache_clear()


def test_learned_penalty_beats_its_unlearned_twin(tmp_path: Path) -> None:
    # Same data, same start; the twin's outer lr is 1e-9, so its penalty stays 1e-3. A sign
    # error in the outer step drives the penalty down, where the test loss only gets worse.
    _, learned = start(["skeleton/ridge.yaml"], FAST, out=tmp_path / "learned")
    _, twin = start(["skeleton/ridge.yaml"], [*FAST, "outer.lr=1e-9"], out=tmp_path / "twin")
    assert twin["hyper/penalty"] == pytest.approx(1e-3, rel=1e-6)
    assert learned["hyper/penalty"] > 1e-2
    assert learned["test/loss"] < 0.7 * twin["test/loss"], (learned, twin)


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    full = run_cli("run", "skeleton/ridge.yaml", "--out", tmp_path / "full", "--set",
                   "run.max_steps=12", "--set", "checkpoint.every=4")
    assert full.code == 0, full
    part = run_cli("run", "skeleton/ridge.yaml", "--out", tmp_path / "part", "--set",
                   "run.max_steps=12", "--set", "checkpoint.every=4",
                   fault="after_checkpoint@2")  # SIGKILL right after step 4's checkpoint
    assert part.code == -9, part
    again = run_cli("resume", tmp_path / "part")
    assert again.code == 0, again
    assert_same_tree(final_state(tmp_path / "part")["state"], final_state(tmp_path / "full")["state"])


def _copy_as(name: str, root: Path) -> Path:
    """The skeleton copied to ``root/<name>``, its recipe renamed: edits inside the copy only."""
    folder = root / name
    shutil.copytree(SKELETON, folder, ignore=shutil.ignore_patterns("__pycache__"))
    init = folder / "__init__.py"
    init.write_text(init.read_text().replace('{"skeleton":', f'{{"{name}":'))
    configs = folder / "configs"
    (configs / "skeleton").rename(configs / name)
    ridge = configs / name / "ridge.yaml"
    ridge.write_text(ridge.read_text().replace("recipe: skeleton", f"recipe: {name}"))
    return folder


def test_a_copied_folder_is_a_new_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         fresh_registry: None, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    # A sixth paper: one new folder beside the others, found with no central list to edit.
    _copy_as("paper6", tmp_path)
    monkeypatch.setattr(recipes, "__path__", [*recipes.__path__, str(tmp_path)])
    assert "paper6" in recipes.names() and "paper6" in recipes.packages()
    assert main(["configs"]) == 0
    assert "paper6/ridge.yaml" in capsys.readouterr().out
    run_dir, summary = start(["paper6/ridge.yaml"], ["run.max_steps=3"], out=tmp_path / "run")
    assert run_dir.recipe == "paper6" and set(summary) == {"val/loss", "test/loss", "hyper/penalty"}
    assert resume(tmp_path / "run", ["run.max_steps=5"], allow_change=True)[0].recipe == "paper6"
    sys.modules.pop("bilevel.recipes.paper6", None)
    sys.modules.pop("bilevel.recipes.paper6.recipe", None)


def test_a_distribution_adds_recipes_by_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    fresh_registry: None) -> None:
    _copy_as("their_paper", tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    good = SimpleNamespace(name="their_paper", value="their_paper")
    broken = SimpleNamespace(name="broken", value="no_such_module_anywhere")
    monkeypatch.setattr(_registry, "entry_points", lambda group: [good, broken])
    with pytest.warns(UserWarning, match="no_such_module_anywhere.*skipped"):
        assert recipes.package_of("their_paper").origin == "their_paper"
    _, summary = start(["their_paper/ridge.yaml"], ["run.max_steps=2"], out=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"
    assert summary["hyper/penalty"] > 0
    sys.modules.pop("their_paper", None)
    sys.modules.pop("their_paper.recipe", None)


def test_a_folder_without_package_or_a_recipe_declared_twice_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "__init__.py").write_text('"""Not a recipe folder."""\n')
    monkeypatch.setattr(recipes, "__path__", [*recipes.__path__, str(tmp_path)])
    with pytest.raises(ConfigError, match="notes is a recipe folder but defines no PACKAGE"):
        recipes.names()
    shutil.rmtree(tmp_path / "notes")
    _registry.packages.cache_clear()
    twin = _copy_as("twin", tmp_path)
    init = twin / "__init__.py"
    init.write_text(init.read_text().replace('{"twin":', '{"skeleton":'))
    with pytest.raises(ConfigError, match="'skeleton' is declared by both"):
        recipes.names()
    for mod in ("bilevel.recipes.notes", "bilevel.recipes.twin"):
        sys.modules.pop(mod, None)


def test_sweep_plans_of_the_old_layout_still_find_their_configs(tmp_path: Path) -> None:
    # Plans written before recipe folders name shipped configs by their old absolute path.
    old = tmp_path / "site-packages" / "bilevel" / "recipes" / "configs" / "onepass" / "random.yaml"
    assert recipes.find_config(old) == recipes.config_dir("onepass") / "random.yaml"
    with pytest.raises(ConfigError, match="not found"):
        recipes.find_config(old.with_name("no_such_algorithm.yaml"))


@pytest.mark.parametrize("policy", ["skip", "abort"])
def test_nan_policy(policy: str, tmp_path: Path) -> None:
    # A NaN hypergradient at outer step 2: skip leaves ρ where it was, abort exits 1.
    out = tmp_path / policy
    res = run_cli("run", "skeleton/ridge.yaml", "--out", out, "--set", "run.max_steps=4",
                  "--set", f"run.nan_policy={policy}", fault="nan_hypergrad@2")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["action"]) for r in records if r.get("event") == "nonfinite"] == [
        (2, policy)]
    if policy == "abort":
        assert res.code == 1 and "non-finite hypergradient at step 2" in res.err, res
    else:
        assert res.code == 0, res


def test_the_cli_names_a_broken_folder_without_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    twin = _copy_as("twin2", tmp_path)
    init = twin / "__init__.py"
    init.write_text(init.read_text().replace('{"twin2":', '{"skeleton":'))
    monkeypatch.setattr(recipes, "__path__", [*recipes.__path__, str(tmp_path)])
    assert main(["configs"]) == 2
    assert "'skeleton' is declared by both" in capsys.readouterr().err
    sys.modules.pop("bilevel.recipes.twin2", None)
