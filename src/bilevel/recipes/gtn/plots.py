"""Figures of Generative Teaching Network runs (matplotlib Agg, PNG).

* :func:`image_grid`: the synthetic curriculum, rows = inner steps, columns = batch
  positions, on the red-black-green colour map of ``GoodAI/GTN`` (``utils_ntb.plot_images``),
  normalised to ``[-1, 1]`` (the generator's ``tanh`` range): negative red, zero black,
  positive green.
* :func:`accuracy_curves`: test accuracy against outer step, one line per run (variant).
* :func:`shuffle_boxplot`: test accuracy of learners trained on the curriculum in its
  learned order versus with the inner steps shuffled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _red_black_green() -> Any:
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("rbg", [(1.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 1.0, 0.0)])


def image_grid(images: torch.Tensor, path: str | Path, *, labels: Sequence[int] | None = None,
               title: str | None = None, max_cols: int = 32) -> Path:
    """Save a grid of generated images; rows = inner steps, columns = batch.

    Args:
        images: ``[T, B, 1, H, W]`` (or ``[T, B, H, W]``) values in ``[-1, 1]``.
        path: the PNG to write (parent folders are created).
        labels: the label of each column, written above the first row.
        title: figure title.
        max_cols: draw at most this many batch columns.

    Returns:
        ``path``.
    """
    x = images.detach().float().cpu()
    if x.dim() == 5:
        if x.shape[2] != 1:
            raise ValueError(f"image_grid draws one-channel images, got {x.shape[2]} channels")
        x = x[:, :, 0]
    if x.dim() != 4:
        raise ValueError(f"images must be [T, B, 1, H, W] or [T, B, H, W], got {tuple(images.shape)}")
    steps, cols = x.shape[0], min(x.shape[1], max_cols)
    h, w = x.shape[2:]
    canvas = np.full((steps * (h + 1) - 1, cols * (w + 1) - 1), np.nan)  # 1-pixel gaps
    for t in range(steps):
        for b in range(cols):
            canvas[t * (h + 1): t * (h + 1) + h, b * (w + 1): b * (w + 1) + w] = x[t, b].numpy()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(3.0, 0.45 * cols), max(2.0, 0.45 * steps + 0.6)))
    cmap = _red_black_green().with_extremes(bad="white")
    ax.imshow(canvas, cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks([t * (h + 1) + h / 2 for t in range(steps)], [str(t) for t in range(steps)])
    if labels is not None:
        ax.set_xticks([b * (w + 1) + w / 2 for b in range(cols)], [str(v) for v in labels[:cols]])
        ax.xaxis.tick_top()
    else:
        ax.set_xticks([])
    ax.set_ylabel("inner step")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def accuracy_curves(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
                    path: str | Path, *, title: str = "test accuracy",
                    reference: Mapping[str, float] | None = None) -> Path:
    """Test accuracy against outer step, one line per label (e.g. curriculum variant).

    Args:
        curves: ``label -> (outer steps, accuracies)``.
        path: the PNG to write.
        title: figure title.
        reference: optional ``label -> accuracy`` drawn as dotted horizontal lines (e.g. a
            paper's values, which the legend marks as such).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, (steps, acc)) in enumerate(curves.items()):
        ax.plot(list(steps), list(acc), marker=".", label=label, color=colours[i % len(colours)])
    for i, (label, value) in enumerate((reference or {}).items()):
        ax.axhline(value, ls=":", lw=1, color=colours[i % len(colours)], label=label)
    ax.set_xlabel("outer step")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def shuffle_boxplot(groups: Mapping[str, Sequence[float]], path: str | Path, *,
                    title: str = "shuffle test") -> Path:
    """Box plot of test accuracies, one box per group (e.g. ``in order`` / ``shuffled``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(groups), 3.6))
    ax.boxplot([list(v) for v in groups.values()], showfliers=True)
    ax.set_xticks(range(1, len(groups) + 1), list(groups))
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
