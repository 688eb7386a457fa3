"""``bilevel run`` and ``bilevel resume``: start a recipe from YAML, or continue one."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(sub: Any) -> None:
    """Add the ``run`` and ``resume`` subcommands."""
    p = sub.add_parser("run", help="run a recipe from YAML config files",
                       description="Run a recipe. Later files and --set override earlier ones.")
    p.add_argument("configs", nargs="+", metavar="CONFIG",
                   help="YAML files, or shipped configs such as toy_hyperlr/diabetes_mlp.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set inner.lr=0.1 (repeatable)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/RECIPE/TIME-HASH)")
    p.add_argument("--seed", type=int, metavar="N", help="shorthand for --set run.seed=N")
    p.set_defaults(handler=_run)

    r = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a key that does not alter the run (e.g. run.max_steps)")
    r.add_argument("--allow-config-change", action="store_true",
                   help="accept changes of run.max_steps, logging.* and checkpoint.keep_last")
    r.set_defaults(handler=_resume)


def _report(run_dir: Any, summary: dict[str, float]) -> int:
    print(json.dumps(summary, indent=1))
    print(f"run directory: {run_dir.path}", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    from bilevel.recipes import start

    run_dir, summary = start(args.configs, args.overrides, out=args.out, seed=args.seed)
    return _report(run_dir, summary)


def _resume(args: argparse.Namespace) -> int:
    from bilevel.recipes import resume

    run_dir, summary = resume(args.run_dir, args.overrides, allow_change=args.allow_config_change)
    return _report(run_dir, summary)
