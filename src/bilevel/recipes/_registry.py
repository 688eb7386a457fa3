"""The recipe registry: name -> module with ``Config`` and ``run(config, run_dir)``.

A recipe module defines

* ``Config``: a :class:`bilevel.run.Section` (pydantic, ``extra="forbid"``) with a
  ``run: RunConfig`` field, usually also ``logging`` and ``checkpoint`` sections;
* ``run(config: Config, run_dir: RunDir) -> dict[str, float]``: the experiment, which
  registers what it owns in a :class:`bilevel.run.RunState`, continues from
  ``run_dir.resume(state)`` and checkpoints through ``run_dir.checkpoint(step, state)``.

A YAML config names its recipe with a top-level ``recipe: NAME`` key; the rest is validated
against that recipe's ``Config``. The CLI, sweeps and tests all go through :func:`start`
and :func:`resume`.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from bilevel.errors import ConfigError
from bilevel.run import (
    RawConfig,
    RunDir,
    configure_determinism,
    load_layers,
    seed_everything,
    validate,
)

RECIPES: dict[str, str] = {
    "alig": "bilevel.recipes.alig",
    "commentaries_blending": "bilevel.recipes.commentaries_blending",
    "commentaries_weighting": "bilevel.recipes.commentaries_weighting",
    "gtn": "bilevel.recipes.gtn",
    "mnist_lr": "bilevel.recipes.mnist_lr",
    "mnist_schedule": "bilevel.recipes.mnist_schedule",
    "onepass": "bilevel.recipes.onepass",
    "toy_hyperlr": "bilevel.recipes.toy_hyperlr",
    "auxilearn": "bilevel.recipes.auxilearn",
    "auxilearn_labels": "bilevel.recipes.auxilearn_labels",
}
CONFIG_ROOT = Path(__file__).resolve().parent / "configs"


def names() -> list[str]:
    """The registered recipe names, sorted."""
    return sorted(RECIPES)


def get(name: str) -> ModuleType:
    """The module of recipe ``name``.

    Raises:
        ConfigError: for an unknown name, listing the known ones.
    """
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(names())}")
    return importlib.import_module(RECIPES[name])


def shipped_configs() -> list[Path]:
    """Every YAML config shipped with the package, sorted."""
    return sorted(CONFIG_ROOT.glob("*/*.yaml"))


def find_config(ref: str | Path) -> Path:
    """A config path as given, or a shipped one named ``recipe/name[.yaml]``."""
    path = Path(ref)
    if path.is_file():
        return path
    for cand in (CONFIG_ROOT / path, CONFIG_ROOT / path.with_suffix(".yaml")):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file {ref} not found (nor a shipped config of that name; "
                      "`bilevel configs` lists them)")


def resolve_raw(raw: RawConfig) -> tuple[str, BaseModel, dict[str, Any]]:
    """Validate merged config data: ``(recipe name, Config instance, resolved dict)``."""
    name = raw.data.get("recipe")
    where = raw.sources.get("recipe", "no file sets it")
    if not isinstance(name, str):
        raise ConfigError(f"recipe ({where}): every config needs a top-level `recipe: NAME` "
                          f"key; known recipes: {', '.join(names())}")
    if name not in RECIPES:
        raise ConfigError(f"recipe = {name!r} ({where}): unknown recipe; known recipes: "
                          f"{', '.join(names())}")
    config = validate(get(name).Config, raw, ignore=("recipe",))
    return name, config, {"recipe": name, **config.model_dump(mode="json")}


def resolve(paths: Sequence[str | Path], overrides: Iterable[str] = ()
            ) -> tuple[str, BaseModel, dict[str, Any]]:
    """Load, layer and validate config files plus ``--set`` overrides."""
    if not paths:
        raise ConfigError("give at least one config file (`bilevel configs` lists shipped ones)")
    return resolve_raw(load_layers([find_config(p) for p in paths], overrides))


def _execute(run_dir: RunDir, config: BaseModel) -> dict[str, float]:
    module = get(run_dir.recipe)
    run_cfg = getattr(config, "run", None)
    with run_dir:
        if run_cfg is not None:
            configure_determinism(deterministic=run_cfg.deterministic, threads=run_cfg.threads)
            seed_everything(run_cfg.seed)
        summary = {k: float(v) for k, v in module.run(config, run_dir).items()}
        run_dir.finish(summary)
    return summary


def start(paths: Sequence[str | Path], overrides: Iterable[str] = (), *,
          out: str | Path | None = None, seed: int | None = None
          ) -> tuple[RunDir, dict[str, float]]:
    """Run a recipe from config files into a new run directory.

    Args:
        paths: config files, later ones overriding earlier ones.
        overrides: ``key.sub=value`` strings applied last.
        out: the run directory (default ``runs/<recipe>/<time>-<hash>``).
        seed: shorthand for ``run.seed=N``.
    """
    overrides = [*overrides, *([f"run.seed={seed}"] if seed is not None else [])]
    name, config, resolved = resolve(paths, overrides)
    if out is None:
        from bilevel.run import config_hash

        out = Path("runs") / name / f"{time.strftime('%Y%m%d-%H%M%S')}-{config_hash(resolved)[:6]}"
    resolved.pop("recipe")
    run_dir = RunDir.create(out, resolved, recipe=name)
    return run_dir, _execute(run_dir, config)


def resume(path: str | Path, overrides: Iterable[str] = (), *, allow_change: bool = False
           ) -> tuple[RunDir, dict[str, float]]:
    """Continue the run in ``path`` from its latest valid checkpoint.

    The config is re-read from ``path/config.yaml`` (plus ``overrides``) and must equal the
    one the run started with, except for keys that do not change the trajectory when
    ``allow_change`` is set.
    """
    run_dir = RunDir.open(path)
    name, config, resolved = resolve_raw(load_layers([Path(path) / "config.yaml"], overrides))
    if name != run_dir.recipe:
        raise ConfigError(f"{path}/config.yaml: recipe changed from {run_dir.recipe!r} to {name!r}")
    run_dir.update_config(resolved, allow_change=allow_change)
    return run_dir, _execute(run_dir, config)
