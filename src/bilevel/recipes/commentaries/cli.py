"""``bilevel commentaries``: evaluate learned commentaries by training new networks with them.

    bilevel commentaries student --teacher runs/c/teacher --seeds 0 1 2 --out eval/  # learned
    bilevel commentaries student --baseline --seeds 0 1 2 --out eval/                # no weighting
    bilevel commentaries blend-eval --grid runs/c/blend --seeds 0 1 --out blend-eval/
    bilevel commentaries plot runs/c/teacher --out figs/

``student`` writes ``<out>/<arm>-seed<N>.json`` (learning curves), then redraws
``<out>/learning_speed.png`` and ``<out>/summary.md`` from every curve file in ``<out>``, so
the learned and baseline arms can be run separately. ``blend-eval`` does the same for the
three arms of Alg. 2 (``none``, ``random``, ``learned``) with ``<out>/summary.md``: per-arm
mean ± std and paired (same-seed) differences with 95% t-intervals. The random arm is
``random-seed`` (the seed's ``--rand_mixup`` grid, λ in [0.635, 0.689]) by default, or
``random-uniform`` (λ ~ U(0.5, 1)) with ``--random-arm uniform``; ``--random-arm seed uniform``
runs both.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def register(cmds: Any) -> None:
    """Add ``commentaries student|blend-eval|plot``."""
    s = cmds.add_parser("student", help="train new students with a learned weighting teacher")
    s.add_argument("--teacher", metavar="RUN_DIR", help="a commentaries_weighting run (teacher.pt)")
    s.add_argument("--baseline", action="store_true", help="train without weighting instead")
    s.add_argument("--with-baseline", action="store_true", help="train both arms")
    s.add_argument("--arch", choices=("cbr", "resnet18"), default="cbr", help="student network")
    s.add_argument("--lr", type=float, default=1e-4, help="Adam lr (seed: the inner lr, 1e-4)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--progress", choices=("clamp", "seed", "stretch"), default="clamp",
                   help="iteration-channel value past the teacher's unroll (see docs)")
    s.add_argument("--evals-per-epoch", type=int, default=4)
    s.add_argument("--weights", choices=("example", "batch-mean"), default="example",
                   help="batch-mean (a control): each example gets its batch's mean teacher "
                        "weight, keeping only the weight-over-time schedule")
    _common(s, epochs=1.0)
    s.set_defaults(handler=_student)
    b = cmds.add_parser("blend-eval", help="train fresh networks with no/random/learned blending")
    b.add_argument("--grid", metavar="RUN_DIR", help="a commentaries_blending run (blending.pt)")
    b.add_argument("--arms", nargs="+", choices=("none", "random", "learned"),
                   default=["none", "random", "learned"])
    b.add_argument("--random-arm", nargs="+", choices=("seed", "uniform"), default=["seed"],
                   help="the random grid: 'seed' = the seed's (logits M ~ U(0.5, 1), so λ in "
                        "[0.635, 0.689]); 'uniform' = λ ~ U(0.5, 1). Both: two labelled arms")
    b.add_argument("--model", choices=("cbr", "resnet18"), default="cbr")
    b.add_argument("--lr", type=float, default=0.1, help="SGD lr (seed: 0.1)")
    b.add_argument("--batch-size", type=int, default=128)
    _common(b, epochs=3.0)
    b.set_defaults(handler=_blend_eval)
    g = cmds.add_parser("plot", help="curriculum plots of a weighting run, λ heat-map of a blending run")
    g.add_argument("run_dir", metavar="RUN_DIR")
    g.add_argument("--out", metavar="DIR", help="where to write PNGs (default: RUN_DIR)")
    g.set_defaults(handler=_plot)


def _common(p: argparse.ArgumentParser, *, epochs: float) -> None:
    p.add_argument("--data", choices=("mnist", "fashion_mnist", "digits"), default="mnist")
    p.add_argument("--data-dir", metavar="DIR")
    p.add_argument("--train-size", type=int, metavar="N", help="subsample the training split")
    p.add_argument("--test-size", type=int, metavar="N", default=10_000)
    p.add_argument("--epochs", type=float, default=epochs)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", required=True, metavar="DIR")


def _data(args: argparse.Namespace) -> Any:
    import torch

    from bilevel.recipes.commentaries.weighting import ImageDataConfig, load_images

    torch.set_num_threads(1)
    cfg = ImageDataConfig(name=args.data, data_dir=args.data_dir, train_size=args.train_size,
                          val_size=None, test_size=args.test_size)
    return load_images(cfg, torch.device("cpu"))[0]


def _file(run_dir: str, name: str, flag: str) -> Path:
    from bilevel.errors import ConfigError

    path = Path(run_dir)
    path = path if path.is_file() else path / name
    if not path.is_file():
        raise ConfigError(f"{flag} {run_dir}: no {name} there; give the run directory of a "
                          "finished (or checkpointed) run")
    return path


def _student(args: argparse.Namespace) -> int:
    from bilevel.errors import ConfigError
    from bilevel.recipes.commentaries.weighting import train_student

    if not args.baseline and not args.teacher:
        raise ConfigError("commentaries student: give --teacher RUN_DIR, or --baseline")
    arms = {"baseline": None} if args.baseline else {"learned": _file(args.teacher, "teacher.pt", "--teacher")}
    if args.with_baseline:
        arms["baseline"] = None
    data, out = _data(args), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for arm, teacher in arms.items():
        for seed in args.seeds:
            curves = train_student(teacher, data=data, seed=seed, epochs=args.epochs, lr=args.lr,
                                   batch_size=args.batch_size, arch=args.arch,
                                   progress_mode=args.progress, evals_per_epoch=args.evals_per_epoch,
                                   weights="batch_mean" if arm == "learned" and args.weights == "batch-mean"
                                   else "example")
            curves |= {"arm": arm, "seed": seed, "teacher": str(teacher), "args": _args(args)}
            (out / f"{arm}-seed{seed}.json").write_text(json.dumps(curves, indent=1))
            print(f"{arm} seed {seed}: test acc {curves['test_acc'][-1]:.4f}")
    _student_report(out)
    return 0


def _student_report(out: Path) -> None:
    from bilevel.recipes.commentaries.plots import plot_learning_speed

    curves: dict[str, list[dict]] = {}
    for f in sorted(out.glob("*-seed*.json")):
        rec = json.loads(f.read_text())
        curves.setdefault(rec["arm"], []).append(rec)
    png = plot_learning_speed(curves, out / "learning_speed.png")
    rows = ["| arm | seeds | " + " | ".join(f"test acc @ {e:.2f} ep" for e in
                                                next(iter(curves.values()))[0]["epoch"]) + " |"]
    rows.append("|---|---|" + "---|" * len(next(iter(curves.values()))[0]["epoch"]))
    for arm, runs in curves.items():
        cols = zip(*(r["test_acc"] for r in runs), strict=True)
        rows.append(f"| {arm} | {len(runs)} | " + " | ".join(_mean_std(c) for c in cols) + " |")
    (out / "summary.md").write_text("\n".join(rows) + "\n")
    print(f"wrote {png} and {out / 'summary.md'}")


def _blend_eval(args: argparse.Namespace) -> int:
    import torch

    from bilevel.errors import ConfigError
    from bilevel.meta import blending
    from bilevel.recipes.commentaries.blending import train_blended

    if "learned" in args.arms and not args.grid:
        raise ConfigError("commentaries blend-eval: arm 'learned' needs --grid RUN_DIR "
                          "(or choose --arms none random)")
    learned = torch.load(_file(args.grid, "blending.pt", "--grid"), weights_only=True)["m"] \
        if "learned" in args.arms else None
    data, out = _data(args), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = [a for arm in args.arms for a in
            ([f"random-{r}" for r in dict.fromkeys(args.random_arm)] if arm == "random" else [arm])]
    for arm in arms:
        for seed in args.seeds:
            grid = {"none": None, "learned": learned,
                    "random-seed": blending.seed_random_logits(10, seed=seed),
                    "random-uniform": blending.random_logits(
                        10, generator=torch.Generator().manual_seed(seed))}[arm]
            res = train_blended(grid, data=data, seed=seed, epochs=args.epochs, model=args.model,
                                lr=args.lr, batch_size=args.batch_size)
            res |= {"arm": arm, "seed": seed, "args": _args(args)}
            (out / f"{arm}-seed{seed}.json").write_text(json.dumps(res, indent=1))
            print(f"{arm} seed {seed}: test acc {res['test_acc']:.4f}")
    recs = [json.loads(f.read_text()) for f in sorted(out.glob("*-seed*.json"))]
    rows = ["| arm | seeds | test acc (mean ± std) | test loss | train acc |", "|---|---|---|---|---|"]
    order = ("none", "random-seed", "random-uniform", "learned")
    for arm in order:
        rs = [r for r in recs if r["arm"] == arm]
        if rs:
            rows.append(f"| {arm} | {len(rs)} | " + " | ".join(
                _mean_std([r[k] for r in rs]) for k in ("test_acc", "test_loss", "train_acc")) + " |")
    rows += ["", "Paired differences in test accuracy (same seed: same init, batches and partners; "
             "95% t-interval over seeds):", "",
             "| comparison | seeds | mean diff | 95% CI |", "|---|---|---|---|"]
    acc = {(r["arm"], r["seed"]): r["test_acc"] for r in recs}
    for a, b in [("learned", "none"), ("learned", "random-seed"), ("learned", "random-uniform"),
                 ("random-seed", "none"), ("random-uniform", "none")]:
        diffs = [acc[a, s] - acc[b, s] for s in sorted({s for (_, s) in acc})
                 if (a, s) in acc and (b, s) in acc]
        if diffs:
            mean, half = paired_ci(diffs)
            rows.append(f"| {a} − {b} | {len(diffs)} | {mean:+.4f} | "
                        f"[{mean - half:+.4f}, {mean + half:+.4f}] |")
    (out / "summary.md").write_text("\n".join(rows) + "\n")
    print(f"wrote {out / 'summary.md'}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    import torch

    from bilevel.errors import ConfigError
    from bilevel.meta import blending
    from bilevel.recipes.commentaries.plots import plot_curriculum, plot_lambda

    run, out = Path(args.run_dir), Path(args.out or args.run_dir)
    if (run / "curriculum.npz").is_file():
        print(plot_curriculum(run / "curriculum.npz", out / "curriculum.png"))
    elif (run / "blending.pt").is_file():
        m = torch.load(run / "blending.pt", weights_only=True)["m"]
        print(plot_lambda(blending.proportions(m), out / "lambda.png"))
    else:
        raise ConfigError(f"{run}: neither curriculum.npz (commentaries_weighting) nor "
                          "blending.pt (commentaries_blending) is there")
    return 0


# two-sided 97.5% quantiles of Student's t, df = 1..30 (beyond: the normal's 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_ci(diffs: list[float]) -> tuple[float, float]:
    """Mean of paired differences and the half-width of its 95% t-interval (NaN for one seed)."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, float("nan")
    t = _T975[len(diffs) - 2] if len(diffs) - 1 <= len(_T975) else 1.96
    return mean, t * statistics.stdev(diffs) / len(diffs) ** 0.5


def _mean_std(values: Any) -> str:
    v = list(values)
    return f"{statistics.fmean(v):.4f} ± {statistics.stdev(v):.4f}" if len(v) > 1 else f"{v[0]:.4f}"


def _args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "handler"}
