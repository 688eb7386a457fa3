"""The recipe-folder protocol: what one paper's folder declares, and nothing else.

A folder ``bilevel/recipes/<folder>/`` (or a third-party package registered under the entry
point group ``bilevel.recipes``) is a recipe package when its ``__init__.py`` defines
``PACKAGE``, a :class:`Package`::

    from bilevel.recipes.package import Package

    PACKAGE = Package(
        help="Generative Teaching Networks (Such et al., ICML 2020)",
        recipes={"gtn": ".recipe"},        # config `recipe: gtn` -> module .recipe
        cli=".cli",                        # optional: `bilevel gtn ...` subcommands
    )

Module names starting with ``.`` are relative to the folder, so a copied folder works under a
new name without edits. Keep ``__init__.py`` this light: the CLI imports every package's
``__init__`` to build its parser, and nothing else until a command runs.

Each **recipe module** defines ``Config`` (a :class:`bilevel.run.Section`) and
``run(config, run_dir) -> dict[str, float]``; optionally ``SEARCH_SPACE`` (the default space
of ``bilevel sweep``) and ``adopt_state(state, config) -> state`` (how a PBT donor's checkpoint
takes a new config). Its shipped configs live in ``<folder>/configs/<recipe name>/*.yaml`` and
are named ``<recipe name>/<file>`` on the command line.

The optional **hooks**:

* ``cli``: a module with ``register(commands) -> None``; ``commands`` is the sub-parser
  action of ``bilevel <folder>``, to which it adds its subcommands with
  ``commands.add_parser(...)``, each setting ``handler`` (a function ``args -> int``);
* ``sweep_report``: ``"module:function"`` called by ``bilevel sweep-report`` for sweeps of
  this package's recipes, as ``function(sweep_dirs, *, metric, out, plots, diverged_at)``
  returning the files written. Without it, ``sweep-report`` writes the generic report
  (:func:`bilevel.report.make_report`, seeds pooled per variant).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Package:
    """One recipe folder's declaration (see the module docstring for the protocol).

    Attributes:
        help: one line for ``bilevel --help`` and ``bilevel configs``.
        recipes: recipe name (the config's ``recipe:`` value) -> module defining ``Config``
            and ``run``; a leading ``.`` means relative to the folder.
        cli: module with ``register(commands)`` for ``bilevel <folder> ...``, or None.
        sweep_report: ``"module:function"`` writing a sweep's report, or None.
    """

    help: str
    recipes: Mapping[str, str]
    cli: str | None = None
    sweep_report: str | None = None
    # Set by the registry when it finds the package: the folder's import name.
    origin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.recipes:
            raise ValueError("a Package declares at least one recipe")
        for name in self.recipes:
            if not _NAME.fullmatch(name):
                raise ValueError(f"recipe name {name!r}: use lower_case letters, digits and _")

    def module(self, name: str) -> ModuleType:
        """Import ``name`` (relative names resolved against the folder)."""
        return importlib.import_module(name, package=self.origin or None)

    def recipe_module(self, recipe: str) -> ModuleType:
        """The module of one of this package's recipes."""
        return self.module(self.recipes[recipe])

    def hook(self, spec: str | None) -> Callable[..., Any] | None:
        """Resolve a ``"module:function"`` hook (None when the package has none)."""
        if spec is None:
            return None
        module, _, attr = spec.partition(":")
        return getattr(self.module(module), attr)
