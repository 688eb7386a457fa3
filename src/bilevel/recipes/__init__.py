"""Recipes: one module per experiment family, each ``Config`` + ``run(config, run_dir)``.

The registry (:mod:`bilevel.recipes._registry`) maps a config's ``recipe:`` key to its module;
shipped YAML configs live in ``bilevel/recipes/configs/<recipe>/``.
"""

from bilevel.recipes._registry import (
    CONFIG_ROOT,
    RECIPES,
    find_config,
    get,
    names,
    resolve,
    resolve_raw,
    resume,
    shipped_configs,
    start,
)

__all__ = [
    "CONFIG_ROOT",
    "RECIPES",
    "find_config",
    "get",
    "names",
    "resolve",
    "resolve_raw",
    "resume",
    "shipped_configs",
    "start",
]
