"""``python -m normlab`` and the ``normlab`` console script.

The command line needs the lab extra (typer, rich, …); without it this says so in one line
instead of a traceback. ``python -m normlab.kernels build|status`` works with the core alone.
"""

from __future__ import annotations

import sys

EXTRA = "pip install 'normlab[lab]'"


def main() -> None:
    """Run the ``normlab`` command."""
    try:
        from .cli import app
    except ImportError as err:
        print(
            f"normlab: the command line needs the lab extra ({err.name or err}): {EXTRA}. "
            "Without it: python -m normlab.kernels build|status.",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    app(prog_name="normlab")


if __name__ == "__main__":
    main()
