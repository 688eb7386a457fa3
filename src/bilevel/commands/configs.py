"""``bilevel configs`` and ``bilevel config validate|show``: the shipped and resolved configs."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the ``configs`` and ``config`` subcommands."""
    p = sub.add_parser("configs", help="list the shipped configs, one line each")
    p.set_defaults(handler=_list)

    c = sub.add_parser("config", help="validate or show a config")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    v = csub.add_parser("validate", help="validate config files (exit 2 with every problem)")
    v.add_argument("configs", nargs="+", metavar="FILE")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key before validating (repeatable)")
    v.set_defaults(handler=_validate)
    s = csub.add_parser("show", help="print the resolved config (every default filled in)")
    s.add_argument("configs", nargs="+", metavar="CONFIG")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(handler=_show)


def _list(args: argparse.Namespace) -> int:
    from bilevel.recipes import config_ref, shipped_configs

    for path in shipped_configs():
        first = path.read_text().splitlines()[0]
        command = first.lstrip("# ").strip()
        print(f"{config_ref(path):40}  {command}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from bilevel.recipes import resolve

    name, _, _ = resolve(args.configs, args.overrides)
    sets = "".join(f" --set {o}" for o in args.overrides)
    print(f"ok: {' + '.join(args.configs)}{sets} is a valid {name} config")
    return 0


def _show(args: argparse.Namespace) -> int:
    from bilevel.recipes import resolve
    from bilevel.run.yamlio import dump_yaml

    _, _, resolved = resolve(args.configs, args.overrides)
    print(dump_yaml(resolved), end="")
    return 0
