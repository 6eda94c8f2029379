"""Render a small table as plain text (reports go to logs, files and notebooks alike)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["render_table"]


def render_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """``rows`` under ``columns`` as aligned text with ``title`` above it.

    Examples
    --------
    >>> print(render_table("t", ["a", "bb"], [(1, "x"), (22, "y")]))
    t
    a   bb
    --  --
    1   x
    22  y
    """
    cells = [[str(c) for c in columns], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([title, line(cells[0]), rule, *(line(r) for r in cells[1:])])
