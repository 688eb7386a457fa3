"""The AliG robustness figure: final training loss and test accuracy against the step-size knob.

Berrada et al. claim that AliG trains well over a wide range of ``max_lr`` whereas SGD and
Adam need a narrow learning-rate window. :func:`plot_sweep` draws one line per optimiser
(the mean over seeds; each seed is a dot) with the knob on a log axis: ``max_lr`` for AliG,
``lr`` for the others. AliG without a cap (``max_lr: null``) is drawn one decade right of
the largest knob and labelled "no cap". A diverged run (non-finite final training loss, or
the recipe's ``train/diverged_step``) or one whose final training loss exceeds the cap
(:data:`LOSS_CAP` by default: about four times MNIST's chance-level loss ln 10 ≈ 2.3; the DNC
objective sums over bits and steps, so its sweep passes a larger one) is an ✕ on the top
edge of the loss panel; its measured accuracy is drawn as is. :func:`sweep_table` writes the
same numbers as Markdown.
:func:`plot_curves` draws training curves of a few runs: minibatch loss, test accuracy and
AliG's step sizes (the seeds' check that the loss goes to about 0 and ``ℓ/‖g‖²`` shrinks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bilevel.report.collect import RunRecord
from bilevel.run.metrics import series

LOSS_CAP = 10.0  # final training losses above this are drawn as ✕ on the top edge


@dataclass(frozen=True)
class SweepPoint:
    """One finished run of the ``alig`` recipe, reduced to what the sweep figure shows."""

    label: str
    knob: float | None  # max_lr (AliG; None = no cap) or lr (SGD, Adam)
    seed: int
    train_loss: float
    val_accuracy: float
    test_accuracy: float
    diverged: bool
    best_test_accuracy: float = math.nan  # of the reloaded best-validation weights


def knob_key(optim: Mapping[str, Any]) -> str:
    """The swept key of an ``optim`` config section: ``max_lr`` for AliG, else ``lr``."""
    return "max_lr" if optim["name"] == "alig" else "lr"


NAMES = {"adam": "Adam", "adagrad": "Adagrad", "rmsprop": "RMSprop"}


def label_of(optim: Mapping[str, Any]) -> str:
    """A legend label naming the optimiser and the settings that distinguish its variants."""
    clip = f", clip {optim['clip_grad_norm']:g}" if optim.get("clip_grad_norm") else ""
    if optim["name"] == "alig":
        ball = f", ‖w‖ ≤ {optim['max_norm']:g}" if optim.get("max_norm") else ""
        adjusted = ", adjusted" if optim.get("adjusted_momentum") else ""  # the other form
        return f"AliG (μ={optim['momentum']:g}{adjusted}{ball}{clip})"
    if optim["name"] == "sgd":
        sched = " + step schedule" if optim.get("decay_at") else ""
        name = "NAG" if optim.get("nesterov") else "SGD"
        mu = f"μ={optim['momentum']:g}" if optim.get("momentum") else ""
        inner = f"{mu}{sched}{clip}".lstrip(", ")
        return f"{name} ({inner})" if inner else name
    inner = clip.lstrip(", ")
    name = NAMES.get(optim["name"], optim["name"])
    return f"{name} ({inner})" if inner else name


def sweep_points(runs: Iterable[RunRecord]) -> list[SweepPoint]:
    """The points of finished ``alig``-recipe runs, sorted by label, knob and seed."""
    points = []
    for run in runs:
        if run.status != "finished" or "optim" not in run.config:
            continue
        optim = run.config["optim"]
        loss = float(run.final.get("train/loss", math.nan))
        diverged = "train/diverged_step" in run.final or not math.isfinite(loss)
        points.append(SweepPoint(label_of(optim), optim[knob_key(optim)],
                                 int(run.config["run"]["seed"]), loss,
                                 float(run.final.get("val/accuracy", math.nan)),
                                 float(run.final.get("test/accuracy", math.nan)), diverged,
                                 float(run.final.get("best/test_accuracy", math.nan))))
    return sorted(points, key=lambda p: (p.label, math.inf if p.knob is None else p.knob, p.seed))


def _by_label(points: list[SweepPoint]) -> dict[str, dict[float, list[SweepPoint]]]:
    """Points by label and knob; an uncapped AliG run sits one decade right of every knob."""
    finite = [p.knob for p in points if p.knob is not None]
    no_cap = 10 ** (math.floor(math.log10(max(finite))) + 1) if finite else 1.0
    out: dict[str, dict[float, list[SweepPoint]]] = {}
    for p in points:
        out.setdefault(p.label, {}).setdefault(no_cap if p.knob is None else p.knob,
                                               []).append(p)
    return out


def plot_sweep(points: list[SweepPoint], path: str | Path, *, title: str = "",
               loss_cap: float = LOSS_CAP) -> Path:
    """Two panels (final train loss, log scale; test accuracy) against the knob; a PNG.

    Losses above ``loss_cap`` (and diverged runs) are ✕ on the top edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_label(points)
    top = loss_cap
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12.5, 3.8))
    for i, (label, by_knob) in enumerate(groups.items()):
        colour, knobs = f"C{i}", sorted(by_knob)
        losses = [_mean([min(_shown(p), top) for p in by_knob[k]]) for k in knobs]
        accs = [_mean([p.test_accuracy for p in by_knob[k]]) for k in knobs]
        style = ("-o", "--s", "-.^", ":D")[i % 4]  # overlapping lines stay distinguishable
        ax_loss.plot(knobs, losses, style, color=colour, label=label, ms=4)
        ax_acc.plot(knobs, accs, style, color=colour, label=label, ms=4)
        for k in knobs:
            for p in by_knob[k]:
                off = _shown(p) > top
                ax_loss.plot([k], [min(_shown(p), top)], "x" if off else ".", color=colour,
                             ms=9 if off else 5)
                ax_acc.plot([k], [p.test_accuracy], ".", color=colour, ms=5, alpha=0.6)
    uncapped = [(k, p) for by_knob in groups.values() for k, ps in by_knob.items()
                for p in ps if p.knob is None]
    for k, _ in uncapped[:1]:
        for ax in (ax_loss, ax_acc):
            ax.annotate("no cap", (k, 0), xycoords=("data", "axes fraction"),
                        xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    ax_loss.set(xscale="log", yscale="log", xlabel="max_lr (AliG) / lr (others)",
                ylabel=f"final training loss (✕: diverged or > {top:g})", ylim=(None, 1.5 * top))
    ax_acc.set(xscale="log", xlabel="max_lr (AliG) / lr (others)", ylabel="test accuracy",
               ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(True, which="major", alpha=0.3)
    ax_acc.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(runs: list[RunRecord], path: str | Path, *, title: str = "") -> Path:
    """Three panels against the step: ``train/batch_loss`` (log), ``test/accuracy`` and,
    for AliG runs, ``alig/step_size`` (solid) and ``alig/step_size_unclipped`` (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for i, run in enumerate(runs):
        label = label_of(run.config["optim"])
        optim = run.config["optim"]
        label += f", {knob_key(optim)}={optim[knob_key(optim)]}"
        for ax, key, style in ((axes[0], "train/batch_loss", "-"),
                               (axes[1], "test/accuracy", "-o"),
                               (axes[2], "alig/step_size", "-"),
                               (axes[2], "alig/step_size_unclipped", ":")):
            steps, values = series(run.records, key)
            if steps:
                ax.plot(steps, values, style, color=f"C{i}", ms=3, lw=1,
                        label=label if key != "alig/step_size_unclipped" else None)
    axes[0].set(yscale="log", xlabel="step", ylabel="minibatch training loss")
    axes[1].set(xlabel="step", ylabel="test accuracy")
    axes[2].set(yscale="log", xlabel="step",
                ylabel="AliG step size γ (solid), ℓ/(‖g‖²+ε) (dotted)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep_table(points: list[SweepPoint]) -> str:
    """Markdown: one row per (optimiser, knob); mean ± sample std over seeds."""
    has_val = any(math.isfinite(p.val_accuracy) for p in points)  # none for repeat copy
    has_best = any(math.isfinite(p.best_test_accuracy) for p in points)
    val_head = " val accuracy |" if has_val else ""
    best_head = " test accuracy, best-val weights |" if has_best else ""
    lines = [f"| optimiser | max_lr / lr | seeds | final train loss |{val_head} "
             f"test accuracy |{best_head} diverged |",
             "|---|---|---|---|---|---|" + "---|" * (has_val + has_best)]
    rows: dict[tuple[str, float | None], list[SweepPoint]] = {}
    for p in points:
        rows.setdefault((p.label, p.knob), []).append(p)
    for (label, knob), ps in rows.items():
        knob_text = "none" if knob is None else f"{knob:g}"
        loss = _mean_std([p.train_loss for p in ps], "{:.3g}")
        val = f" {_mean_std([p.val_accuracy for p in ps], '{:.4f}')} |" if has_val else ""
        test = _mean_std([p.test_accuracy for p in ps], "{:.4f}")
        best = (f" {_mean_std([p.best_test_accuracy for p in ps], '{:.4f}')} |"
                if has_best else "")
        lines.append(f"| {label} | {knob_text} | {len(ps)} | {loss} |{val} {test} |{best} "
                     f"{sum(p.diverged for p in ps)}/{len(ps)} |")
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float], fmt: str) -> str:
    mean = _mean(values)
    if len(values) < 2:
        return fmt.format(mean)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{fmt.format(mean)} ± {fmt.format(std)}"


def _shown(p: SweepPoint) -> float:
    return math.inf if p.diverged or not math.isfinite(p.train_loss) else p.train_loss


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
