"""What the command line shares: where it writes, and how its help names arguments.

Output goes to a live terminal, or to a pipe or file that gets plain lines. Tables fit the
terminal's width (rich wraps their cells); in a pipe they keep their natural width, one row
per line, unless ``COLUMNS`` asks for a width.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING, Any

import typer.core

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["PlainCommand", "PlainGroup", "interactive", "print_table", "table_console"]

_UNLIMITED = 10_000  # rich needs a width; tables do not expand, so this is "natural width"
_BRACED = re.compile(r"^\{(.*)\}(?=\.\.\.$|$)")


def _plain(param: Any) -> Any:
    """``param`` without a type placeholder in the help: a flag's ``<bool>`` and an argument's
    ``<list[str]>`` say nothing its name and help do not."""
    if getattr(param, "is_flag", False) and param.metavar is None:
        param.metavar = ""
    if isinstance(param, typer.core.TyperArgument):
        param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
    return param


class PlainCommand(typer.core.TyperCommand):
    """A command whose help names arguments as ``EXPERIMENT...``, as click and man pages do
    (recent typer versions write a required argument as ``{names}...``), and shows no
    ``<bool>`` for flags."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [_BRACED.sub(r"\1", p) for p in super().collect_usage_pieces(ctx)]

    def get_params(self, ctx: Any) -> list[Any]:
        return [_plain(p) for p in super().get_params(ctx)]


class PlainGroup(typer.core.TyperGroup):
    """A command group with :class:`PlainCommand`'s help (its commands pass ``cls=PlainCommand``)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return [_plain(p) for p in super().get_params(ctx)]


def interactive() -> bool:
    """Whether both stdout and stderr are terminals (then live progress may redraw lines)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def table_console() -> Console:
    """A rich console on stdout: the terminal's width, ``COLUMNS`` if set, else no limit."""
    from rich.console import Console

    explicit = sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit()
    return Console(width=None if explicit else _UNLIMITED)


def print_table(table: object, console: Console | None = None) -> None:
    """Print a rich renderable on ``console`` (default :func:`table_console`) without the
    trailing spaces rich pads its lines with."""
    console = console or table_console()
    with console.capture() as captured:
        console.print(table)
    text = "\n".join(line.rstrip() for line in captured.get().splitlines())
    console.file.write(text + "\n")
    console.file.flush()
