"""Shared matplotlib helpers for the lab's figures (Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["new_figure", "save"]


def new_figure(
    rows: int = 1, cols: int = 1, *, width: float = 6.0, height: float | None = None
) -> tuple[Any, Any]:
    """A figure and a flat array of axes (always indexable), sized for a report page."""
    fig, axes = plt.subplots(rows, cols, figsize=(width, height or 3.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    return fig, axes.flatten()


def save(fig: Any, path: Path) -> Path:
    """Save at 110 dpi with a tight layout and close the figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
