"""Figure of a learned training schedule (``mnist_schedule``'s ``schedule.json``, matplotlib Agg):
learning rate (log scale) and momentum against the inner step, for the learned schedule, its
constant start, the hand-written step schedule and the best fixed learning rate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def plot_schedule(path: str | Path, out: str | Path, *, title: str = "learned schedule") -> Path:
    """Two panels, lr and momentum per step; returns ``out``.

    Args:
        path: ``schedule.json`` with ``steps``, ``every`` and, per arm, ``lr`` and ``momentum``
            lists (one value per ``every`` steps); ``best_fixed`` names the best fixed arm.
        out: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d: dict[str, Any] = json.loads(Path(path).read_text())
    steps, every = d["steps"], d["every"]
    edges = [*steps, steps[-1] + every]
    arms = [("learned", "tab:red", "-"), ("start", "tab:gray", ":"), ("step", "tab:blue", "--"),
            (d["best_fixed"], "tab:green", "-.")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, ax in zip(("lr", "momentum"), axes, strict=True):
        for name, colour, style in arms:
            values = d[name][key]
            label = name.replace("fixed_", "best fixed lr ") if name == d["best_fixed"] else name
            ax.stairs(values, edges, baseline=None, color=colour, linestyle=style, label=label,
                      linewidth=2 if name == "learned" else 1.2)
        ax.set(xlabel="inner SGD step", ylabel=key, title=f"{title}: {key}")
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
