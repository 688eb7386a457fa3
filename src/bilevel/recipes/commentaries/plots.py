"""Figures of the Commentaries recipes (matplotlib Agg): the curriculum a weighting teacher
learned, the learned blending proportions, and learning-speed curves of new students.

* :func:`plot_curriculum` reads ``curriculum.npz`` of a ``commentaries_weighting`` run: mean
  teacher weight over training progress per class, and for the easiest / hardest quarter of
  probe images (hardness = NLL under the student at the end of the last unroll), plus the
  weights the teacher gave inside that unroll.
* :func:`plot_lambda` draws ``λ_ij = 1 − 0.5σ(M_ij)`` as a heat-map (cmap Reds, range
  [0.5, 1], as the seed's ``mixup-ep*-itr*.pdf``).
* :func:`plot_learning_speed` draws accuracy against training step for several arms
  (median and min–max over seeds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curriculum(npz: str | Path, out: str | Path, *, title: str = "learned curriculum") -> Path:
    """Three panels: weight vs progress per class; easy vs hard quarter; weights in the unroll.

    Args:
        npz: ``curriculum.npz`` (keys ``progress [P]``, ``weights [P, N]``, ``labels [N]``,
            ``hardness [N]``, ``unroll_weights [T, B]``, ``unroll_labels [T, B]``).
        out: the PNG to write.
    """
    d = np.load(npz)
    grid, w, labels, hard = d["progress"], d["weights"], d["labels"], d["hardness"]
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    cmap = plt.get_cmap("tab10")
    for c in np.unique(labels):
        axes[0].plot(grid, w[:, labels == c].mean(1), color=cmap(int(c) % 10), label=str(int(c)))
    axes[0].set(xlabel="training progress (inner step / steps)", ylabel="mean weight",
                title="per class (probe images)")
    axes[0].legend(ncol=5, fontsize=7)
    order = np.argsort(hard)
    q = max(1, len(order) // 4)
    for name, idx, colour in (("easiest 25%", order[:q], "tab:green"),
                              ("hardest 25%", order[-q:], "tab:red"),
                              ("all", order, "tab:gray")):
        mean, std = w[:, idx].mean(1), w[:, idx].std(1)
        axes[1].plot(grid, mean, color=colour, label=name)
        axes[1].fill_between(grid, mean - std, mean + std, color=colour, alpha=0.15)
    axes[1].set(xlabel="training progress", ylabel="weight", title="easy vs hard (by student NLL)")
    axes[1].legend(fontsize=8)
    uw, uy = d["unroll_weights"], d["unroll_labels"]
    steps = np.repeat(np.arange(len(uw))[:, None], uw.shape[1], axis=1)
    axes[2].scatter(steps.ravel(), uw.ravel(), c=[cmap(int(c) % 10) for c in uy.ravel()], s=6)
    axes[2].set(xlabel="inner step", ylabel="weight", title="weights in the last unroll")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)


def plot_lambda(lam: Any, out: str | Path, *, title: str = "learned blending λ") -> Path:
    """Heat-map of a ``[C, C]`` matrix of blending proportions (rows: class i, cols: partner j)."""
    lam = np.asarray(lam.detach().cpu() if hasattr(lam, "detach") else lam, dtype=float)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4))
    im = ax.imshow(lam, cmap="Reds", vmin=0.5, vmax=1.0)
    ax.set(xlabel="partner class j", ylabel="class i", title=title,
           xticks=range(lam.shape[1]), yticks=range(lam.shape[0]))
    fig.colorbar(im, ax=ax, label="λ_ij (share of class i kept)")
    fig.tight_layout()
    return _save(fig, out)


def plot_learning_speed(curves: Mapping[str, Sequence[Mapping[str, Sequence[float]]]],
                        out: str | Path, *, key: str = "test_acc",
                        title: str = "learning speed of new students") -> Path:
    """Accuracy vs step for each arm: median over seeds, min–max band, one panel per key.

    Args:
        curves: ``{arm: [{"step": [...], key: [...]}, ...one per seed]}``.
        out: the PNG to write.
        key: the metric on the y axis (``test_acc`` or ``train_acc``).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for arm, runs in curves.items():
        steps = np.asarray(runs[0]["step"])
        values = np.array([r[key] for r in runs])  # [seeds, points]
        line = ax.plot(steps, np.median(values, 0), marker="o", ms=3, label=f"{arm} (n={len(runs)})")
        ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2, color=line[0].get_color())
    ax.set(xlabel="training step", ylabel=key.replace("_", " "), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, out)


def _save(fig: Any, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out
