"""``bilevel alig sweep`` and ``bilevel alig plot``: the AliG step-size robustness study.

``sweep`` runs the ``alig`` recipe for every config (one per optimiser) × knob value × seed,
where the knob is ``optim.max_lr`` for AliG and ``optim.lr`` for the others, then writes
``sweep.png`` (final training loss and test accuracy vs the knob) and ``sweep.md`` into
``--out``. Each run lives in ``OUT/<config name>/<knob>=<value>/seed-<n>``; running the same
command again skips finished runs and resumes interrupted ones. ``plot`` redraws the
figure and table from existing runs; ``curves`` draws the training curves (loss, test
accuracy, AliG step sizes) of a few runs::

    bilevel alig sweep alig/mnist_mlp_alig.yaml alig/mnist_mlp_sgd.yaml \\
        alig/mnist_mlp_adam.yaml --values 1e-4,1e-3,1e-2,1e-1,1,10 --out runs/alig/sweep
    bilevel alig plot runs/alig/sweep --out sweep.png
    bilevel alig curves runs/alig/a runs/alig/b --out curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bilevel.errors import ConfigError


def register(cmds: Any) -> None:
    """Add ``alig sweep`` and ``alig plot``."""
    s = cmds.add_parser("sweep", help="run alig-recipe configs over a grid of max_lr / lr",
                        description="The knob is optim.max_lr for AliG, optim.lr otherwise.")
    s.add_argument("configs", nargs="+", metavar="CONFIG",
                   help="alig-recipe configs, e.g. alig/mnist_mlp_alig.yaml (one per optimiser)")
    s.add_argument("--values", required=True, type=_floats, metavar="V1,V2,...",
                   help="knob values, e.g. 1e-4,1e-3,1e-2,1e-1,1,10; 'none' is AliG's "
                        "uncapped max_lr")
    s.add_argument("--seeds", default=[0], type=_ints, metavar="S1,S2,...",
                   help="seeds (default 0)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of every run, e.g. --set run.max_steps=200")
    s.add_argument("--out", required=True, metavar="DIR", help="directory of the runs")
    s.add_argument("--title", default="", help="figure title")
    s.add_argument("--loss-cap", type=float, default=10.0, metavar="X",
                   help="final losses above X are drawn as ✕ (default 10; repeat copy: 1000)")
    s.set_defaults(handler=_sweep)
    q = cmds.add_parser("plot", help="sweep.png and sweep.md from existing alig runs")
    q.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_GLOB")
    q.add_argument("--out", required=True, metavar="PNG", help="figure path (table beside it)")
    q.add_argument("--title", default="", help="figure title")
    q.add_argument("--loss-cap", type=float, default=10.0, metavar="X",
                   help="final losses above X are drawn as ✕ (default 10; repeat copy: 1000)")
    q.set_defaults(handler=_plot)
    c = cmds.add_parser("curves", help="training curves of alig runs (loss, accuracy, step size)")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR")
    c.add_argument("--out", required=True, metavar="PNG", help="figure path")
    c.add_argument("--title", default="", help="figure title")
    c.set_defaults(handler=_curves)


def _floats(text: str) -> list[float | None]:
    try:
        values = [None if v.strip().lower() == "none" else float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1e-3,1e-2 (or none), got "
                                         f"{text!r}") from None
    if any(v is not None and not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"step sizes must be > 0, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2, got {text!r}") from None


def _sweep(args: argparse.Namespace) -> int:
    from bilevel.recipes import find_config, resolve, resume, start

    out = Path(args.out)
    keys = {}
    for ref in args.configs:  # check every config before running any
        name, config, _ = resolve([ref], args.overrides)
        if name != "alig":
            raise ConfigError(f"{ref}: bilevel alig sweep runs alig-recipe configs, not {name!r}")
        optim = config.optim.name  # type: ignore[attr-defined]
        keys[ref] = "max_lr" if optim == "alig" else "lr"
        if keys[ref] == "lr" and None in args.values:
            raise ConfigError(f"{ref}: --values none means AliG's uncapped max_lr; {optim} "
                              f"needs a numeric lr. Sweep AliG separately into the same --out.")
    for ref, key in keys.items():
        for value in args.values:
            text = "none" if value is None else f"{value:g}"
            for seed in args.seeds:
                run_dir = out / find_config(ref).stem / f"{key}={text}" / f"seed-{seed}"
                overrides = [*args.overrides, f"optim.{key}={'null' if value is None else repr(value)}",
                             f"run.seed={seed}"]
                status = _status(run_dir, resolve([ref], overrides)[2])
                if status == "finished":
                    continue
                if status is None:
                    start([ref], overrides, out=run_dir)
                else:
                    resume(run_dir)
                print(f"{run_dir}: done", flush=True)
    args.runs = [str(out)]
    args.out = str(out / "sweep.png")
    return _plot(args)


def _status(run_dir: Path, wanted: dict[str, Any]) -> str | None:
    """The status of an existing run (None: none yet) that must have run ``wanted``."""
    from bilevel.run import changed_keys

    info = run_dir / "run.json"
    if not info.is_file():
        return None
    run = json.loads(info.read_text())
    changed = [k for k in changed_keys(run["config"], wanted)
               if not k.startswith(("logging.", "checkpoint."))]
    if changed:
        raise ConfigError(f"{run_dir} holds a run of a different config ({'; '.join(changed)}); "
                          "give the sweep another --out or delete that run")
    return run.get("status")


def _plot(args: argparse.Namespace) -> int:
    from bilevel.recipes.alig.plots import plot_sweep, sweep_points, sweep_table
    from bilevel.report import find_runs, load_run

    points = sweep_points(load_run(p) for p in find_runs(args.runs))
    if not points:
        raise ConfigError(f"no finished alig-recipe runs in {' '.join(args.runs)}")
    png = plot_sweep(points, args.out, title=args.title, loss_cap=args.loss_cap)
    table = png.with_suffix(".md")
    table.write_text(sweep_table(points))
    print(table.read_text(), end="")
    print(png)
    print(table)
    return 0


def _curves(args: argparse.Namespace) -> int:
    from bilevel.recipes.alig.plots import plot_curves
    from bilevel.report import find_runs, load_run

    runs = [r for r in map(load_run, find_runs(args.runs)) if "optim" in r.config]
    if not runs:
        raise ConfigError(f"no alig-recipe runs in {' '.join(args.runs)}")
    print(plot_curves(runs, args.out, title=args.title))
    return 0
