"""``normlab bench --plot``: one horizontal bar per case, ratio normlab / baseline (< 1: faster)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ._core import Result

__all__ = ["plot_ratios"]

_COLORS = {"train fwd": "tab:blue", "train fwd+bwd": "tab:orange", "eval fwd": "tab:green"}


def plot_ratios(
    results: Sequence[Result], path: Path, title: str = "normlab bench", dpi: int = 72
) -> Path:
    """Write a bar chart of every result's ratio to ``path`` (format from its suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.suite}: {r.name} · {r.mode}" for r in results]
    ratios = [r.ratio for r in results]
    colors = [_COLORS.get(r.mode, "tab:gray") for r in results]
    fig, ax = plt.subplots(figsize=(9, 0.25 * len(results) + 1.5))
    ax.barh(range(len(results)), ratios, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(results)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time ratio normlab / baseline (same run; < 1 is faster)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
