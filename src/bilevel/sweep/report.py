"""``bilevel sweep-report``: the report of a sweep directory, by its recipe's hook if any.

The recipe of a sweep is read from its plan (``sweep.json``: base configs plus the first
variant). A recipe package that declares ``sweep_report`` (see
:class:`bilevel.recipes.package.Package`) writes its own report — Clarke et al.'s bootstrap
table for ``onepass``. Otherwise the generic report is written: per variant, bootstrap
mean / median / best of every final metric over the finished initialisations
(``summary.md``, ``summary.csv``) and the metric curves (``curves.png``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from bilevel.errors import ConfigError


def sweep_recipe(sweep_dir: str | Path) -> str:
    """The recipe name the runs of ``sweep_dir`` use."""
    from bilevel.recipes import resolve
    from bilevel.sweep.plan import plan_from_json

    path = Path(sweep_dir) / "sweep.json"
    if not path.is_file():
        raise ConfigError(f"{sweep_dir} has no sweep.json: give a directory made by `bilevel sweep`")
    plan = plan_from_json(json.loads(path.read_text()))
    first = next(iter(plan.variants.values()), None)
    return resolve([*plan.base, *([first] if first else [])])[0]


def write_sweep_report(sweep_dirs: str | Path | Sequence[str | Path], *, metric: str | None = None,
                       out: str | Path | None = None, plots: bool = True,
                       diverged_at: float | None = None) -> list[Path]:
    """Write the report of one sweep, or of several paired ones; returns the files written."""
    from bilevel.recipes import package_of

    dirs = [Path(sweep_dirs)] if isinstance(sweep_dirs, (str, Path)) else [Path(d) for d in sweep_dirs]
    if not dirs:
        raise ConfigError("give at least one sweep directory")
    recipes = {sweep_recipe(d) for d in dirs}
    if len(recipes) > 1:
        raise ConfigError(f"these sweeps run different recipes ({', '.join(sorted(recipes))}); "
                          "report them separately")
    package = package_of(recipes.pop())
    hook = package.hook(package.sweep_report)
    if hook is not None:
        return list(hook(dirs, metric=metric, out=out, plots=plots, diverged_at=diverged_at))
    if diverged_at is not None:
        raise ConfigError(f"--diverged-at: the recipes of {package.origin} have no sweep report "
                          "that counts diverged runs; leave it out")
    return _generic(dirs, metric=metric, out=Path(out) if out else dirs[0], plots=plots)


def _generic(dirs: list[Path], *, metric: str | None, out: Path, plots: bool) -> list[Path]:
    from bilevel.report import load_run
    from bilevel.report.plots import plot_report
    from bilevel.report.tables import summarise, write_csv, write_markdown

    groups: dict[str, list] = {}
    for root in dirs:
        for variant in sorted(p for p in root.iterdir() if p.is_dir()):
            runs = [load_run(r) for r in sorted(variant.glob("init-*")) if (r / "run.json").is_file()]
            if runs:
                groups.setdefault(variant.name, []).extend(runs)
    if not groups:
        raise ConfigError(f"{', '.join(map(str, dirs))}: no finished runs yet")
    rows = summarise(groups)
    if metric is not None:
        rows = [row for row in rows if row[1] == metric]
        if not rows:
            raise ConfigError(f"--metric {metric}: no run reports it")
    out.mkdir(parents=True, exist_ok=True)
    files = [write_markdown(rows, out / "summary.md"), write_csv(rows, out / "summary.csv")]
    if plots:
        files += plot_report(groups, out)
    return files
