"""``bilevel sweep``: many runs sharing random initialisations; ``bilevel sweep-report``:
the seed's table and loss-evolution figure over a sweep directory."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    """Add the ``sweep`` and ``sweep-report`` subcommands."""
    p = sub.add_parser(
        "sweep", help="run algorithms over shared random initialisations (resumable)",
        description="Draw --inits initialisations from the recipe's search space, run every "
                    "algorithm config on each (same draws, same run.seed) with --parallel "
                    "processes, then write the table. Run it again to continue after a crash: "
                    "finished runs are skipped, unfinished ones resumed.")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="configs shared by every run")
    p.add_argument("-a", "--algorithm", dest="algorithms", action="append", default=[],
                   metavar="CONFIG", help="one variant per flag, layered after CONFIG...")
    p.add_argument("--inits", type=int, required=True, metavar="N")
    p.add_argument("--parallel", type=int, default=1, metavar="P", help="worker processes")
    p.add_argument("--out", required=True, metavar="DIR", help="sweep directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (run.seed = seed + i)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run (repeatable)")
    p.add_argument("--space", metavar="FILE", help="YAML search space (default: the recipe's)")
    p.add_argument("--engine", default="local", help="sweep engine (default: local)")
    p.set_defaults(handler=_sweep)

    r = sub.add_parser("sweep-report", help="the paper's table (bootstrap mean/median/best) "
                       "and loss-evolution figure of a sweep directory")
    r.add_argument("sweep_dir", metavar="SWEEP_DIR")
    r.add_argument("--metric", help="final metric (default: test/loss_unnormalised, "
                   "test/perplexity or test/loss, whichever the runs have)")
    r.add_argument("--out", metavar="DIR", help="where to write table.md/.csv and the figure "
                   "(default: SWEEP_DIR)")
    r.add_argument("--no-plots", action="store_true")
    r.set_defaults(handler=_report)


def _sweep(args: argparse.Namespace) -> int:
    from bilevel.runs.yamlio import load_yaml
    from bilevel.sweep import sweep

    space = load_yaml(args.space)[0] if args.space else None

    def show(r: Any) -> None:
        extra = f" ({r.seconds:.1f} s)" if r.outcome == "finished" else ""
        print(f"{r.outcome:8s} {r.trial.variant}/init-{r.trial.index:04d}{extra}", flush=True)
        if r.error:
            print(r.error, file=sys.stderr)

    results = sweep(args.configs, args.algorithms, inits=args.inits, out=args.out,
                    parallel=args.parallel, seed=args.seed, overrides=args.overrides,
                    space=space, engine=args.engine, on_result=show)
    failed = sum(r.outcome == "failed" for r in results)
    print(f"{len(results)} runs: {failed} failed; table: bilevel sweep-report {args.out}")
    return 1 if failed else 0


def _report(args: argparse.Namespace) -> int:
    from bilevel.report.onepass_table import write_report

    for path in write_report(args.sweep_dir, metric=args.metric, out=args.out,
                             plots=not args.no_plots):
        print(path)
    return 0
