"""``bilevel sweep-report`` of a recipe without a report hook: the generic bootstrap report."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bilevel.errors import ConfigError
from bilevel.sweep import sweep
from bilevel.sweep.report import sweep_recipe, write_sweep_report


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_a_recipe_without_a_hook_gets_the_generic_report(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    results = sweep(["skeleton/ridge.yaml"], inits=3, out=out, overrides=["run.max_steps=2"])
    assert [r.outcome for r in results] == ["finished"] * 3
    assert sweep_recipe(out) == "skeleton"
    files = write_sweep_report(out, plots=False)
    assert [f.name for f in files] == ["summary.md", "summary.csv"]
    rows = {r["metric"]: r for r in _rows(out / "summary.csv")}
    assert rows["test/loss"]["group"] == "run" and rows["test/loss"]["runs"] == "3"
    only = write_sweep_report(out, metric="test/loss", out=tmp_path / "only", plots=False)
    assert [r["metric"] for r in _rows(only[1])] == ["test/loss"]
    with pytest.raises(ConfigError, match="--diverged-at"):
        write_sweep_report(out, diverged_at=1e3, plots=False)
    with pytest.raises(ConfigError, match="no run reports it"):
        write_sweep_report(out, metric="val/acc", plots=False)
    with pytest.raises(ConfigError, match=r"no sweep\.json"):
        write_sweep_report(tmp_path, plots=False)
