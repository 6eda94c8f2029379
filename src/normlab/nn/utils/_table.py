"""Render a small table as plain text with ``rich`` (no colour codes: reports go to logs and files)."""

from __future__ import annotations

import io
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

__all__ = ["render_table"]


def render_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], *, width: int = 120
) -> str:
    """``rows`` under ``columns`` as a boxed text table with ``title`` above it."""
    table = Table(show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False).print(table)
    return f"{title}\n{buffer.getvalue().rstrip()}"
