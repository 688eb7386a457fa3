"""``bilevel report``: tables with bootstrap statistics and PNG curves over runs."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the ``report`` subcommand."""
    p = sub.add_parser("report", help="summary tables and plots over run directories",
                       description="Runs that differ only by seed are pooled into one row.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_GLOB")
    p.add_argument("--out", default="report", metavar="DIR", help="output directory")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib)")
    p.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from bilevel.report import make_report

    for path in make_report(args.runs, args.out, plots=not args.no_plots):
        print(path)
    return 0
