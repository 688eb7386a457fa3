"""Recipes: one folder per paper (and per small demo), each discovered, none listed centrally.

A folder declares ``PACKAGE`` (:class:`bilevel.recipes.package.Package`): its recipes (a
config's ``recipe:`` value -> a module with ``Config`` and ``run``), and optional hooks for
its CLI subcommands and its sweep report. Shipped configs live in
``<folder>/configs/<recipe>/*.yaml``. :mod:`bilevel.recipes._registry` finds the folders and
starts and resumes runs; ``docs/architecture.md`` shows a whole recipe folder (``skeleton``).
"""

from bilevel.recipes._registry import (
    ENTRY_POINT_GROUP,
    config_dir,
    config_ref,
    find_config,
    get,
    names,
    package_of,
    packages,
    resolve,
    resolve_raw,
    resume,
    shipped_configs,
    start,
)
from bilevel.recipes.package import Package

__all__ = [
    "ENTRY_POINT_GROUP",
    "Package",
    "config_dir",
    "config_ref",
    "find_config",
    "get",
    "names",
    "package_of",
    "packages",
    "resolve",
    "resolve_raw",
    "resume",
    "shipped_configs",
    "start",
]
