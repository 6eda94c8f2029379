"""The ``normlab`` command line: ``normlab bench``, ``normlab lab …``, ``normlab --version``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from . import __version__

app = typer.Typer(
    help="normlab: input standardization, initialization and batch normalization for PyTorch.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"normlab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """normlab command line."""


@app.command()
def bench(
    quick: Annotated[bool, typer.Option(help="Fewer, smaller cases (about a minute).")] = False,
    suite: Annotated[
        list[str] | None,
        typer.Option(help="Suite(s) to run; default all. Repeat the option for several."),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="normlab backend: auto, reference, native, fused.")
    ] = "auto",
    repeats: Annotated[
        int, typer.Option(min=3, help="Timed repeats per side (median reported).")
    ] = 20,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the results as JSON.")
    ] = None,
) -> None:
    """Time normlab against torch in the same process: ratio = normlab / torch (< 1 is faster)."""
    from rich.console import Console
    from rich.table import Table

    from .bench import SUITES, BenchOptions, run_cases

    names = suite or list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise typer.BadParameter(f"unknown suite(s) {unknown}; available: {', '.join(SUITES)}")
    options = BenchOptions(quick=quick, repeats=repeats, backend=backend)
    console = Console(stderr=True)
    results = []
    for name in names:
        cases = SUITES[name](options)
        with console.status(f"timing {name} ({len(cases)} cases)") as status:
            results += run_cases(cases, options, lambda c: status.update(f"{c.name} {c.mode}"))
    table = Table(title=f"normlab bench (backend={backend}, median of {repeats})")
    for col in ("suite", "case", "mode", "baseline ms", "normlab ms", "ratio"):
        table.add_column(col, justify="right" if "ms" in col or col == "ratio" else "left")
    for r in results:
        table.add_row(
            r.suite, r.name, r.mode, f"{r.baseline_ms:.3f}", f"{r.normlab_ms:.3f}", f"{r.ratio:.2f}"
        )
    Console().print(table)
    if json_path is not None:
        json_path.write_text(json.dumps([r.as_dict() for r in results], indent=2))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="normlab")


if __name__ == "__main__":  # pragma: no cover
    main()
