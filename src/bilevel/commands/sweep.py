"""``bilevel sweep``: many runs sharing random initialisations; ``bilevel sweep-report``:
the table and figure of a sweep directory (the recipe's own report where it has one)."""

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
    p.add_argument("--inits", type=int, metavar="N",
                   help="shared random initialisations (without --scheduler)")
    p.add_argument("--parallel", type=int, default=1, metavar="P", help="worker processes")
    p.add_argument("--out", required=True, metavar="DIR", help="sweep directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (run.seed = seed + i)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run (repeatable)")
    p.add_argument("--space", metavar="FILE", help="YAML search space (default: the recipe's)")
    p.add_argument("--engine", default="local", choices=("local", "optuna", "ray"),
                   help="local: embedded process pool (default); optuna: this process is one "
                   "worker of a shared study (--storage); ray: Ray Tune (--ray-address)")
    s = p.add_argument_group("scheduled sweeps (docs/sweeps.md)")
    s.add_argument("--scheduler", choices=("random", "asha", "pbt", "bo"),
                   help="tune with a scheduler instead of running --inits")
    s.add_argument("--trials", type=int, default=30, metavar="N",
                   help="trials (ASHA/random/BO; default 30, Clarke et al.'s BO budget)")
    s.add_argument("--metric", default="val/loss", help="summary key to minimise (val/loss)")
    s.add_argument("--search", default="", metavar="KEYS",
                   help="comma-separated keys of the space to search (default: all)")
    s.add_argument("--max-resource", type=int, metavar="R", help="budget (default run.max_steps)")
    s.add_argument("--min-resource", type=int, metavar="R", help="ASHA's first rung")
    s.add_argument("--reduction-factor", type=int, default=4, metavar="ETA", help="ASHA's η (4)")
    s.add_argument("--population", type=int, default=8, help="PBT population (8)")
    s.add_argument("--interval", type=int, metavar="R", help="PBT perturbation interval")
    s.add_argument("--sampler", default="tpe", choices=("tpe", "gp"), help="BO sampler (tpe)")
    s.add_argument("--storage", metavar="URL", help="Optuna storage: postgresql://..., "
                   "sqlite:///x.db or a .journal file (default OUT/.../study.journal)")
    s.add_argument("--ray-address", metavar="HOST:PORT", help="existing Ray cluster")
    p.set_defaults(handler=_sweep)

    r = sub.add_parser("sweep-report", help="table and figure of a sweep directory (the "
                       "recipe's report: for onepass, the paper's bootstrap table)")
    r.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR",
                   help="one sweep directory, or several made with the same --seed and space "
                   "(e.g. a later sweep of another algorithm): their runs are paired")
    r.add_argument("--metric", help="final metric (default: the recipe's; onepass: "
                   "test/loss_unnormalised, test/perplexity or test/loss, whichever the runs have)")
    r.add_argument("--out", metavar="DIR", help="where to write table.md/.csv, summary.md and "
                   "the figure (default: the first SWEEP_DIR)")
    r.add_argument("--diverged-at", type=float, metavar="X", help="count final values >= X as "
                   "diverged, like NaN (Clarke et al. use 1e3 for Fashion-MNIST losses)")
    r.add_argument("--no-plots", action="store_true")
    r.set_defaults(handler=_report)


def _scheduled(args: argparse.Namespace, space: Any) -> int:
    from bilevel.sweep.scheduled import scheduled_sweep

    def show(label: str, job: Any, r: Any) -> None:
        print(f"{label} job {job.id:4d} trial {job.trial:4d} {job.kind:8s} -> {job.budget:6d}: "
              f"{r.value:.6g} ({r.seconds:.1f} s)", flush=True)
        if r.error:
            print(r.error, file=sys.stderr)
    report = scheduled_sweep(
        args.configs, args.algorithms, scheduler=args.scheduler, out=args.out,
        trials=args.trials, engine=args.engine, parallel=args.parallel, seed=args.seed,
        overrides=args.overrides, space=space, search=[k for k in args.search.split(",") if k],
        metric=args.metric, max_resource=args.max_resource, min_resource=args.min_resource,
        reduction_factor=args.reduction_factor, population=args.population,
        interval=args.interval, sampler=args.sampler, storage=args.storage,
        ray_address=args.ray_address, on_result=show)
    for label, entry in report.items():
        if "best" in entry:
            print(f"{label}: best {args.metric} = {entry['best']['value']:.6g}")
            if "replay" in entry["best"]:
                print(f"  replay: {entry['best']['replay']}")
        if "totals" in entry:
            t = entry["totals"]
            print(f"  {t['jobs']:.0f} jobs, {t['trial_steps']:.0f} trial-steps, "
                  f"{t['seconds']:.1f} s of training")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from bilevel.run.yamlio import load_yaml
    from bilevel.sweep import sweep

    space = load_yaml(args.space)[0] if args.space else None
    if args.scheduler:
        return _scheduled(args, space)
    if args.inits is None:
        print("bilevel sweep: give --inits N, or --scheduler random|asha|pbt|bo",
              file=sys.stderr)
        return 2

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
    from bilevel.sweep.report import write_sweep_report

    for path in write_sweep_report(args.sweep_dirs, metric=args.metric, out=args.out,
                                   plots=not args.no_plots, diverged_at=args.diverged_at):
        print(path)
    return 0
