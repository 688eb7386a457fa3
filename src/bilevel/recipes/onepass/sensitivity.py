"""Clarke et al.'s sensitivity study: final loss over the update interval T and Neumann terms i.

The study runs one sweep per cell, all from the same ``--seed`` (so initialisation ``k`` is the
same starting point in every cell):

* ``ROOT/ours-T{T}-i{i}``: Ours WD+LR+M with ``algorithm.weight_steps=T``,
  ``algorithm.terms=i`` and ``run.max_steps=400·T`` (400 hyper-steps, as the paper);
* ``ROOT/random-T{T}``: Random with the same ``run.max_steps``, the baseline of row T.

For every cell it reports the bootstrap median ± std of the final metric over initialisations,
and on how many initialisations the cell beat Random of the same T (paired by
initialisation). The heat-map shows the medians on a log colour scale, each cell annotated
with its median and its paired win count.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bilevel.errors import ConfigError
from bilevel.recipes.onepass.summary import final
from bilevel.recipes.onepass.table import load_sweep
from bilevel.report.stats import BootstrapSummary, bootstrap_summary

_CELL = re.compile(r"^ours-T(\d+)-i(\d+)$")
_RANDOM = re.compile(r"^random-T(\d+)$")


@dataclass(frozen=True)
class Cell:
    """One (T, i) cell: its statistics and its paired record against Random at the same T."""

    T: int
    i: int
    stats: BootstrapSummary
    wins: int  # initialisations where the cell ended below Random (both finite)
    paired: int  # initialisations where both ended finite


def _finals(root: Path, metric: str) -> dict[str, float]:
    groups = load_sweep(root)
    if len(groups) != 1:
        raise ConfigError(f"{root}: expected one algorithm per sweep, found {sorted(groups)}")
    (runs,) = groups.values()
    return {r.path.name: final(r, metric) for r in runs}


def collect(root: str | Path, metric: str = "test/loss_unnormalised") -> tuple[list[Cell], dict[int, BootstrapSummary]]:
    """Read every ``ours-T*-i*`` and ``random-T*`` sweep under ``root``."""
    root = Path(root)
    cells_dirs = {tuple(map(int, m.groups())): p for p in sorted(root.iterdir())
                  if (m := _CELL.match(p.name))}
    random_dirs = {int(m.group(1)): p for p in sorted(root.iterdir()) if (m := _RANDOM.match(p.name))}
    if not cells_dirs:
        raise ConfigError(f"{root}: no ours-T<T>-i<i> sweep directories (see docs/results.md)")
    randoms = {T: _finals(p, metric) for T, p in random_dirs.items()}
    cells = []
    for (T, i), path in sorted(cells_dirs.items()):
        mine = _finals(path, metric)
        base = randoms.get(T, {})
        both = [(mine[k], base[k]) for k in mine.keys() & base.keys()
                if math.isfinite(mine[k]) and math.isfinite(base[k])]
        cells.append(Cell(T, i, bootstrap_summary(list(mine.values())),
                          sum(a < b for a, b in both), len(both)))
    return cells, {T: bootstrap_summary(list(v.values())) for T, v in randoms.items()}


def markdown(cells: list[Cell], randoms: dict[int, BootstrapSummary], metric: str) -> str:
    """Rows T, columns i: median ± std (wins/paired vs Random); last column Random's median."""
    Ts, Is = sorted({c.T for c in cells}), sorted({c.i for c in cells})
    at = {(c.T, c.i): c for c in cells}
    lines = [f"Median final {metric} ± bootstrap std over the finite runs (initialisations where "
             "the cell beat Random at the same T / paired; diverged runs)", "",
             "| T \\ i | " + " | ".join(f"i = {i}" for i in Is) + " | Random |",
             "|---|" + "---:|" * (len(Is) + 1)]
    for T in Ts:
        row = []
        for i in Is:
            c = at.get((T, i))
            nan = f", {c.stats.dropped} NaN" if c is not None and c.stats.dropped else ""
            row.append("—" if c is None else
                       f"{c.stats.median:.3g} ± {c.stats.median_std:.2g} ({c.wins}/{c.paired}{nan})")
        r = randoms.get(T)
        row.append("—" if r is None else f"{r.median:.3g} ± {r.median_std:.2g}")
        lines.append(f"| T = {T} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def heatmap(cells: list[Cell], metric: str, path: Path) -> Path:
    """The paper-style heat-map of median final ``metric`` over (T, i)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    Ts, Is = sorted({c.T for c in cells}), sorted({c.i for c in cells})
    grid = np.full((len(Ts), len(Is)), np.nan)
    for c in cells:
        grid[Ts.index(c.T), Is.index(c.i)] = c.stats.median
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    finite = grid[np.isfinite(grid) & (grid > 0)]
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size else None
    im = ax.imshow(grid, origin="lower", cmap="viridis_r", norm=norm)
    for c in cells:
        y, x = Ts.index(c.T), Is.index(c.i)
        light = norm is not None and math.isfinite(c.stats.median) and norm(c.stats.median) < 0.5
        ax.text(x, y, f"{c.stats.median:.3g}\n{c.wins}/{c.paired}", ha="center", va="center",
                fontsize=7, color="black" if light else "white")  # dark text on the yellow end
    ax.set_xticks(range(len(Is)), [str(i) for i in Is])
    ax.set_yticks(range(len(Ts)), [str(T) for T in Ts])
    ax.set_xlabel("Neumann terms i")
    ax.set_ylabel("update interval T")
    ax.set_title(f"Ours WD+LR+M: median final {metric}\n(wins over Random at the same T / paired)",
                 fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(root: str | Path, *, metric: str = "test/loss_unnormalised", out: str | Path | None = None,
          plots: bool = True) -> list[Path]:
    """Write ``sensitivity.md`` (and ``sensitivity.png``) for the study under ``root``."""
    cells, randoms = collect(root, metric)
    dest = Path(out or root)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "sensitivity.md").write_text(markdown(cells, randoms, metric))
    files = [dest / "sensitivity.md"]
    if plots:
        files.append(heatmap(cells, metric, dest / "sensitivity.png"))
    return files
