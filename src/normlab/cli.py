"""The ``normlab`` command line: ``normlab bench``, ``normlab lab …``, ``normlab --version``."""

from __future__ import annotations

import json
import sys
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
    tune_allocator: Annotated[
        bool,
        typer.Option(
            help="Keep large blocks in the process (normlab.perf.tune_cpu_allocator); "
            "applies to torch and normlab alike."
        ),
    ] = True,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the results as JSON.")
    ] = None,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", help="Also plot the ratios per case (png/svg/pdf).")
    ] = None,
) -> None:
    """Time normlab against torch in the same process: ratio = normlab / torch (< 1 is faster).

    Efficiency columns: the op's minimum memory traffic priced at the floors measured in
    this run (copy into a preallocated tensor; read-only sum) ÷ its time.
    """
    from rich.console import Console
    from rich.table import Table

    from .bench import (
        RESULT_SUITES,
        SUITES,
        BenchOptions,
        geomean_ratios,
        plot_ratios,
        run_cases,
    )
    from .functional import BACKENDS

    available = [*SUITES, *RESULT_SUITES]
    names = suite or available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise typer.BadParameter(f"unknown suite(s) {unknown}; available: {', '.join(available)}")
    if backend not in BACKENDS:
        raise typer.BadParameter(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    allocator = "default"
    if tune_allocator:
        from .perf import tune_cpu_allocator

        settings = tune_cpu_allocator()
        allocator = "tuned" if settings.applied else f"default ({settings.reason})"
    options = BenchOptions(
        quick=quick, repeats=repeats, backend=backend, tune_allocator=tune_allocator
    )
    console = Console(stderr=True)
    results = []
    for name in names:
        if name in RESULT_SUITES:
            with console.status(f"timing {name} (child processes)"):
                results += RESULT_SUITES[name](options)
            continue
        cases = SUITES[name](options)
        with console.status(f"timing {name} ({len(cases)} cases)") as status:
            results += run_cases(cases, options, lambda c: status.update(f"{c.name} {c.mode}"))
    title = f"normlab bench (backend={backend}, allocator {allocator}, median of {repeats})"
    table = Table(title=title)
    columns = ("suite", "case", "mode", "baseline", "base ms", "normlab ms", "ratio")
    for col in (*columns, "base eff", "normlab eff"):
        table.add_column(col, justify="right" if col not in columns[:4] else "left")

    def eff(v: float | None) -> str:
        return "" if v is None else f"{v:.2f}"

    for r in results:
        table.add_row(
            r.suite,
            r.name,
            r.mode,
            r.baseline_label,
            f"{r.baseline_ms:.3f}",
            f"{r.normlab_ms:.3f}",
            f"{r.ratio:.2f}",
            eff(r.baseline_eff),
            eff(r.normlab_eff),
        )
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    for name in names:
        for mode in ("train fwd", "train fwd+bwd", "eval fwd"):
            rows = [r for r in results if r.suite == name and r.mode == mode]
            fp32 = [r for r in rows if "fp32" in r.name]
            if rows:
                typer.echo(
                    f"{name} {mode}: geometric-mean ratio {geomean_ratios(rows):.3f} "
                    f"(fp32 only: {geomean_ratios(fp32):.3f}), max {max(r.ratio for r in rows):.3f}"
                )
    if json_path is not None:
        meta = {"backend": backend, "allocator": allocator, "repeats": repeats, "quick": quick}
        payload = {"meta": meta, "results": [r.as_dict() for r in results]}
        json_path.write_text(json.dumps(payload, indent=2))
    if plot_path is not None:
        plot_ratios(results, plot_path, title)


kernels_app = typer.Typer(
    help="The fused C++ kernels: compile them ahead of time, or see where they are cached.",
    no_args_is_help=True,
)


@kernels_app.command("build")
def kernels_build() -> None:
    """Compile the fused kernels now (once per machine and torch version, ~15-60 s)."""
    from .kernels.__main__ import build

    raise typer.Exit(build())


@kernels_app.command("status")
def kernels_status() -> None:
    """Where the kernel cache is and whether the kernels are built and usable (exit 1 if not)."""
    from .kernels.__main__ import status

    raise typer.Exit(status())


app.add_typer(kernels_app, name="kernels")

from .lab._cli import lab_app  # noqa: E402

app.add_typer(lab_app, name="lab")


def main() -> None:
    """Console-script entry point (see :mod:`normlab.__main__`)."""
    app(prog_name="normlab")
