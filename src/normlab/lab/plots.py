"""Figures for the lab: matplotlib's object API with the Agg canvas (no pyplot, no global backend).

Conventions: per-seed values are drawn as dots beside their mean and 95 % interval
(:func:`seed_dots`); paired panels share their y-axis (``new_figure(..., sharey=True)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["new_figure", "same_ylim", "save", "seed_dots"]


def new_figure(
    rows: int = 1,
    cols: int = 1,
    *,
    width: float = 6.0,
    height: float | None = None,
    sharey: bool = False,
) -> tuple[Figure, Any]:
    """A figure and a flat array of axes (always indexable), sized for a report page."""
    fig = Figure(figsize=(width, height or 3.8 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    return fig, axes.flatten()


def same_ylim(*axes: Any) -> None:
    """Give ``axes`` (paired panels, already drawn) one y-range: the union of their own."""
    lows, highs = zip(*(ax.get_ylim() for ax in axes))
    for ax in axes:
        ax.set_ylim(min(lows), max(highs))


def save(fig: Figure, path: Path) -> Path:
    """Save at 110 dpi with a tight layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def seed_dots(
    ax: Any,
    groups: Sequence[tuple[str, Sequence[float | None]]],
    *,
    colors: Sequence[str] | None = None,
    zero_line: bool = False,
) -> None:
    """One column per group: every seed's value as a dot (jittered), and the mean with its
    95 % t interval as a bar. Missing values (diverged runs) are left out and counted in the label."""
    from .experiments import t_interval

    rng = np.random.default_rng(0)
    labels = []
    for i, (label, values) in enumerate(groups):
        vals = np.asarray([np.nan if v is None else v for v in values], dtype=float)
        ok = vals[np.isfinite(vals)]
        missing = vals.size - ok.size
        labels.append(label + (f"\n({missing} missing)" if missing else ""))
        color = colors[i] if colors is not None else f"C{i}"
        ax.scatter(i + rng.uniform(-0.12, 0.12, ok.size), ok, s=14, color=color, alpha=0.7)
        if ok.size >= 2:
            mean, lo, hi = t_interval(ok.tolist())
            ax.errorbar(
                [i + 0.25],
                [mean],
                yerr=[[mean - lo], [hi - mean]],
                fmt="o",
                color="k",
                capsize=4,
                markersize=5,
            )
        elif ok.size:
            ax.plot([i + 0.25], [float(ok[0])], "o", color="k", markersize=5)
    ax.set_xticks(range(len(groups)), labels)
    if zero_line:
        ax.axhline(0.0, color="gray", lw=1, ls=":")
