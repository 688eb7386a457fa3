"""``bilevel onepass sensitivity ROOT``: Clarke et al.'s heat-map of the final loss over the
update interval T and the Neumann terms i.

The paper's table and loss-evolution figure of one sweep come from the generic
``bilevel sweep-report``, which calls this package's hook (:func:`bilevel.recipes.onepass.table.write_report`).
"""

from __future__ import annotations

import argparse
from typing import Any


def register(cmds: Any) -> None:
    """Add ``onepass sensitivity``."""
    g = cmds.add_parser("sensitivity", help="the sensitivity heat-map over the update interval "
                        "T and Neumann terms i",
                        description="Read ROOT/ours-T<T>-i<i> and ROOT/random-T<T> (sweeps made "
                        "with the same --seed) and write sensitivity.md and sensitivity.png: "
                        "median final loss per cell and its paired wins over Random.")
    g.add_argument("root", metavar="ROOT")
    g.add_argument("--metric", default="test/loss_unnormalised")
    g.add_argument("--out", metavar="DIR", help="default: ROOT")
    g.add_argument("--no-plots", action="store_true")
    g.set_defaults(handler=_sensitivity)


def _sensitivity(args: argparse.Namespace) -> int:
    from bilevel.recipes.onepass.sensitivity import write

    for path in write(args.root, metric=args.metric, out=args.out, plots=not args.no_plots):
        print(path)
    return 0
