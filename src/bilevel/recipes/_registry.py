"""The recipe registry: recipe folders are discovered, configs resolved, runs started.

Every sub-package of ``bilevel.recipes`` that declares ``PACKAGE`` (a
:class:`bilevel.recipes.package.Package`) is a recipe folder, and so is every module
registered under the entry point group ``bilevel.recipes`` by another distribution: there is
no central list to edit. A recipe module defines

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

import dataclasses
import functools
import importlib
import pkgutil
import time
import warnings
from collections.abc import Iterable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from bilevel.errors import ConfigError
from bilevel.recipes.package import Package
from bilevel.run import (
    RawConfig,
    RunDir,
    configure_determinism,
    load_layers,
    seed_everything,
    validate,
)

ENTRY_POINT_GROUP = "bilevel.recipes"


@functools.cache
def packages() -> dict[str, Package]:
    """Every recipe folder: ``{folder name: Package}``, built-in ones first, sorted.

    Raises:
        ConfigError: a built-in folder without ``PACKAGE``, or a recipe name declared twice.
    """
    import bilevel.recipes as root

    found: dict[str, Package] = {}
    for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda i: i.name):
        if info.ispkg and not info.name.startswith("_"):
            found[info.name] = _load(f"bilevel.recipes.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:  # a broken plug-in must not take the built-in recipes down with it
            pkg = _load(ep.value)
        except Exception as exc:
            warnings.warn(f"recipe package {ep.value!r} (entry point {ep.name!r}) skipped: "
                          f"{exc}", stacklevel=2)
            continue
        if ep.name in found:
            raise ConfigError(f"recipe package {ep.value!r}: the folder name {ep.name!r} is "
                              "taken; register it under another entry-point name")
        found[ep.name] = pkg
    _index(found)  # refuse a recipe name declared twice now, not at first use
    return found


def _load(module_name: str) -> Package:
    module = importlib.import_module(module_name)
    pkg = getattr(module, "PACKAGE", None)
    if not isinstance(pkg, Package):
        raise ConfigError(f"{module_name} is a recipe folder but defines no PACKAGE: declare "
                          "one (see bilevel.recipes.package), or move it out of bilevel/recipes")
    return dataclasses.replace(pkg, origin=module_name)


def _index(found: dict[str, Package]) -> dict[str, Package]:
    index: dict[str, Package] = {}
    for pkg in found.values():
        for name in pkg.recipes:
            if name in index:
                raise ConfigError(f"recipe {name!r} is declared by both {index[name].origin} "
                                  f"and {pkg.origin}; rename one")
            index[name] = pkg
    return index


def package_of(name: str) -> Package:
    """The package that declares recipe ``name``.

    Raises:
        ConfigError: for an unknown name, listing the known ones.
    """
    index = _index(packages())
    if name not in index:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(names())}")
    return index[name]


def names() -> list[str]:
    """The recipe names of every package, sorted."""
    return sorted(_index(packages()))


def get(name: str) -> ModuleType:
    """The module of recipe ``name`` (``Config``, ``run``, optional hooks)."""
    return package_of(name).recipe_module(name)


def config_dir(name: str) -> Path:
    """Where recipe ``name``'s shipped configs live: ``<folder>/configs/<name>/``."""
    pkg = package_of(name)
    folder = importlib.import_module(pkg.origin).__file__
    assert folder is not None
    return Path(folder).resolve().parent / "configs" / name


def shipped_configs() -> list[Path]:
    """Every YAML config shipped with a recipe package, sorted by name."""
    return [p for name in names() for p in sorted(config_dir(name).glob("*.yaml"))]


def config_ref(path: Path) -> str:
    """The short name of a shipped config, ``recipe/file.yaml``."""
    return f"{path.parent.name}/{path.name}"


def find_config(ref: str | Path) -> Path:
    """A config path as given, or a shipped one named ``recipe/name[.yaml]``."""
    path = Path(ref)
    if path.is_file():
        return path
    parts = path.parts
    # Before recipe folders, shipped configs lived in bilevel/recipes/configs/<recipe>/, and
    # sweep plans written then name them by that absolute path: read them as short names.
    if len(parts) > 4 and parts[-4:-2] == ("recipes", "configs"):
        parts = parts[-2:]
    if len(parts) == 2 and parts[0] in names():
        where = config_dir(parts[0]) / parts[1]
        for cand in (where, where.with_suffix(".yaml")):
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
    if name not in names():
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
