"""``bilevel gtn``: tools for Generative Teaching Network runs.

* ``bilevel gtn shuffle-test RUN_DIR --learners 100``: fresh learners on the run's final
  curriculum, in order vs with the inner steps shuffled; writes ``shuffle.json`` and
  ``shuffle.png`` and prints medians and quartiles.
* ``bilevel gtn plot RUN_DIR... --out acc.png``: test accuracy against outer step, one line
  per run (labelled by its curriculum, or ``--labels``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(gsub: Any) -> None:
    """Add ``gtn shuffle-test`` and ``gtn plot``."""

    s = gsub.add_parser("shuffle-test", help="in-order vs shuffled curriculum, box plot",
                        description="Train fresh learners on RUN_DIR's final teacher with the "
                                    "inner steps in the learned order and shuffled.")
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.add_argument("--learners", type=_positive, default=100, help="learners per arm (100)")
    s.add_argument("--test-size", type=_positive, default=None, metavar="N",
                   help="evaluate on the first N test images (default: all)")
    s.add_argument("--seed", type=int, default=0, help="seed of inits, orders and noise")
    s.add_argument("--step", type=_positive, default=None, metavar="N",
                   help="take the teacher from outer step N's checkpoint (default: the latest)")
    s.add_argument("--out", default=None, metavar="DIR", help="output folder (default RUN_DIR)")
    s.set_defaults(handler=_shuffle)

    q = gsub.add_parser("plot", help="test accuracy against outer step across runs")
    q.add_argument("runs", nargs="+", metavar="RUN_DIR")
    q.add_argument("--out", required=True, metavar="PNG")
    q.add_argument("--labels", nargs="+", default=None, help="one label per run")
    q.add_argument("--title", default="test accuracy")
    q.set_defaults(handler=_plot)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _shuffle(args: argparse.Namespace) -> int:
    from bilevel.recipes.gtn.evaluate import shuffle_test

    result = shuffle_test(args.run_dir, learners=args.learners, test_size=args.test_size,
                          seed=args.seed, step=args.step, out=args.out)
    print(f"{result['curriculum']} curriculum, outer step {result['outer_step']}, "
          f"{result['learners']} learners, {result['test_size']} test images")
    for arm, s in result["summary"].items():
        print(f"  {arm:9s} median {s['median']:.4f}  IQR {s['q1']:.4f}-{s['q3']:.4f}  "
              f"mean {s['mean']:.4f}")
    print(Path(args.out or args.run_dir) / "shuffle.png")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from bilevel.recipes.gtn.evaluate import accuracy_plot

    if args.labels is not None and len(args.labels) != len(args.runs):
        raise SystemExit(f"error: --labels needs one label per run ({len(args.runs)}), "
                         f"got {len(args.labels)}")
    print(accuracy_plot(args.runs, args.out, labels=args.labels, title=args.title))
    return 0
