"""The ``bilevel`` command: a thin registry of subcommands.

Each module in ``bilevel.commands`` exposes ``register(subparsers)``, which adds its
subcommands and sets ``handler`` (a function ``args -> int``) on each. Every recipe folder
with a ``cli`` hook gets ``bilevel <folder> ...`` (its own subcommands, discovered: see
:mod:`bilevel.recipes.package`). This file parses, dispatches, and maps exceptions to exit
codes; it holds no logic of its own.

Exit codes: 0 ok, 1 a run failed (or a file could not be read or written: read-only file
system, no permission, disk full), 2 usage or config error, 3 data missing or failed
verification, 4 no valid checkpoint, 130 / 143 stopped by SIGINT / SIGTERM after a clean
checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from bilevel.errors import ConfigError

# One entry per module in bilevel/commands/ (the commands every recipe shares). Keep sorted.
COMMAND_MODULES: tuple[str, ...] = ("configs", "data", "report", "run", "sweep")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bilevel", description="Learn how a network should be trained, by hypergradients."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"bilevel.commands.{name}").register(sub)
    _recipe_commands(sub)
    return parser


def _recipe_commands(sub: argparse._SubParsersAction) -> None:
    """``bilevel <folder> SUBCOMMAND`` for every recipe folder that declares a ``cli`` hook."""
    from bilevel.recipes import packages

    taken = set(sub.choices)
    for folder, pkg in packages().items():
        if pkg.cli is None:
            continue
        if folder in taken:  # a folder must not shadow a shared command
            raise ConfigError(f"recipe folder {pkg.origin}: `bilevel {folder}` is a shared "
                              "command; rename the folder")
        p = sub.add_parser(folder, help=pkg.help)
        cmds = p.add_subparsers(dest=f"{folder}_command", metavar="SUBCOMMAND")
        cmds.required = True
        pkg.module(pkg.cli).register(cmds)


def _version() -> str:
    from bilevel import __version__

    return f"bilevel {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ConfigError as exc:  # a recipe folder or plug-in that cannot be loaded: name it
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt as exc:  # a second Ctrl-C/SIGTERM carries its own exit code
        print("interrupted", file=sys.stderr)
        return int(getattr(exc, "exit_code", 130))
    except BrokenPipeError:  # `bilevel configs | head`: the reader left early, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0
    except Exception as exc:  # map library errors to exit codes; re-raise the rest
        code = getattr(exc, "exit_code", None)
        if code is None and isinstance(exc, OSError):  # the environment, not a bug: no traceback
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"error: {where}{exc.strerror or exc} (check that the path is writable and "
                  "the disk has space)", file=sys.stderr)
            return 1
        if code is None:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return int(code)


if __name__ == "__main__":
    raise SystemExit(main())
