"""The ``normlab`` command line: ``normlab bench``, ``normlab lab …``, ``normlab --version``."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from ._cli_support import PlainCommand, PlainGroup, print_table

app = typer.Typer(
    help="normlab: input standardization, initialization and batch normalization for PyTorch.",
    no_args_is_help=True,
    cls=PlainGroup,
    rich_markup_mode="markdown",
)


def _versions() -> str:
    """normlab's and torch's versions, and whether the fused kernels are built here."""
    import torch

    from .kernels import kernel_status

    status = kernel_status()
    if status.usable:
        kernels = f"built (cache {status.cache})"
    elif status.built:
        kernels = f"built but not usable: {status.reason}"
    else:
        kernels = f"not built: `normlab kernels build` compiles them (cache {status.cache})"
    return f"normlab {__version__}\ntorch {torch.__version__}\nfused kernels: {kernels}"


def _version(value: bool) -> None:
    if value:
        typer.echo(_versions())
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version,
            is_eager=True,
            help="Print normlab's and torch's versions, whether the fused kernels are built, "
            "and exit.",
        ),
    ] = False,
) -> None:
    """normlab command line."""


class Suite(StrEnum):
    """``normlab bench --suite``'s choices (the suites of :mod:`normlab.bench`)."""

    batchnorm = "batchnorm"
    act = "act"
    variants = "variants"
    model = "model"
    fold = "fold"
    lab = "lab"
    allocator = "allocator"
    standardizer = "standardizer"


class BackendName(StrEnum):
    """``normlab bench --backend``'s choices (:data:`normlab.functional.BACKENDS`)."""

    auto = "auto"
    reference = "reference"
    native = "native"
    fused = "fused"


def _ms(value: float) -> str:
    """Milliseconds with four significant digits (0.01234, 1.234, 1234)."""
    return f"{value:.4g}" if value < 1000 else f"{value:.0f}"


def bench_tables(results: list[Any]) -> list[Any]:
    """The bench results as rich tables, one per suite (its baseline in the title when all its
    cases share one); case names wrap to fit the terminal, numbers never do."""
    from rich import box
    from rich.table import Table

    def eff(v: float | None) -> str:
        return "" if v is None else f"{v:.2f}"

    tables = []
    for suite in dict.fromkeys(r.suite for r in results):
        rows = [r for r in results if r.suite == suite]
        baselines = list(dict.fromkeys(r.baseline_label for r in rows))
        title = f"{suite}: normlab vs {baselines[0]}" if len(baselines) == 1 else suite
        table = Table(
            title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False
        )
        table.add_column("case", overflow="fold")
        table.add_column("mode", no_wrap=True)
        if len(baselines) > 1:
            table.add_column("baseline", no_wrap=True)
        table.add_column("base\nms", justify="right", no_wrap=True)
        table.add_column("normlab\nms", justify="right", no_wrap=True)
        table.add_column("ratio", justify="right", no_wrap=True)
        efficiency = any(r.baseline_eff is not None or r.normlab_eff is not None for r in rows)
        if efficiency:
            table.add_column("base\neff", justify="right", no_wrap=True)
            table.add_column("normlab\neff", justify="right", no_wrap=True)
        for r in rows:
            cells = [r.name, r.mode] + ([r.baseline_label] if len(baselines) > 1 else [])
            cells += [_ms(r.baseline_ms), _ms(r.normlab_ms), f"{r.ratio:.2f}"]
            if efficiency:
                cells += [eff(r.baseline_eff), eff(r.normlab_eff)]
            table.add_row(*cells)
        tables.append(table)
    return tables


def bench_summary(results: list[Any], names: list[str]) -> list[str]:
    """One line per suite and mode: the geometric-mean ratio, the fp32 cases' own where the
    suite has fp32 cases and others besides, and the largest ratio."""
    from .bench import geomean_ratios

    lines = []
    for name in names:
        modes = dict.fromkeys(r.mode for r in results if r.suite == name)
        for mode in modes:
            rows = [r for r in results if r.suite == name and r.mode == mode]
            fp32 = [r for r in rows if "fp32" in r.name]
            parts = [f"geometric-mean ratio {geomean_ratios(rows):.3f}"]
            if fp32 and len(fp32) < len(rows):
                parts.append(f"fp32 only {geomean_ratios(fp32):.3f}")
            parts.append(f"max {max(r.ratio for r in rows):.3f}")
            lines.append(f"{name} {mode}: " + ", ".join(parts))
    return lines


@app.command(cls=PlainCommand)
def bench(
    quick: Annotated[bool, typer.Option(help="Fewer, smaller cases (about a minute).")] = False,
    suite: Annotated[
        list[Suite] | None,
        typer.Option(
            metavar="NAME",
            help="Suite to run (repeat the option for several; default all): "
            f"{', '.join(s.value for s in Suite)}.",
            show_default=False,
        ),
    ] = None,
    backend: Annotated[
        BackendName,
        typer.Option(
            metavar="NAME",
            help=f"normlab's backend: {', '.join(b.value for b in BackendName)}.",
        ),
    ] = BackendName.auto,
    repeats: Annotated[
        int, typer.Option(metavar="N", min=3, help="Timed repeats per side (median reported).")
    ] = 20,
    tune_allocator: Annotated[
        bool,
        typer.Option(
            help="Let glibc keep large blocks in the process (normlab.perf's "
            "tune_cpu_allocator), for torch and normlab alike."
        ),
    ] = True,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", metavar="FILE", help="Also write the results as JSON."),
    ] = None,
    plot_path: Annotated[
        Path | None,
        typer.Option("--plot", metavar="FILE", help="Also plot the ratios per case (png/svg/pdf)."),
    ] = None,
) -> None:
    """Time normlab against torch in the same process: ratio = normlab / torch (< 1 is faster).

    Efficiency columns: the op's minimum memory traffic priced at the floors measured in
    this run (copy into a preallocated tensor; read-only sum) ÷ its time; in the lab suite
    (the lab's batched ensembles against K sequential models), the step's matrix products and
    convolutions alone, forward and backward, ÷ the step's time.
    """
    from rich.console import Console

    from .bench import RESULT_SUITES, SUITES, BenchOptions, plot_ratios, run_cases

    names = [Suite(s).value for s in suite] if suite else [s.value for s in Suite]
    names = list(dict.fromkeys(names))
    backend_name = BackendName(backend).value
    allocator = "default"
    if tune_allocator:
        from .perf import tune_cpu_allocator

        settings = tune_cpu_allocator()
        allocator = "tuned" if settings.applied else f"default ({settings.reason})"
    options = BenchOptions(
        quick=quick, repeats=repeats, backend=backend_name, tune_allocator=tune_allocator
    )
    console = Console(stderr=True)
    results = []
    for name in names:
        if name in RESULT_SUITES:
            with console.status(f"timing {name}"):
                results += RESULT_SUITES[name](options)
            continue
        cases = SUITES[name](options)
        with console.status(f"timing {name} ({len(cases)} cases)") as status:
            results += run_cases(cases, options, lambda c: status.update(f"{c.name} {c.mode}"))
    title = f"normlab bench (backend={backend_name}, allocator {allocator}, median of {repeats})"
    typer.echo(title)
    for table in bench_tables(results):
        typer.echo("")
        print_table(table)
    typer.echo("")
    for line in bench_summary(results, names):
        typer.echo(line)
    if json_path is not None:
        from .bench import machine_info

        meta = {
            "backend": backend_name,
            "allocator": allocator,
            "repeats": repeats,
            "quick": quick,
            **machine_info(),
        }
        payload = {"meta": meta, "results": [r.as_dict() for r in results]}
        json_path.write_text(json.dumps(payload, indent=2))
    if plot_path is not None:
        plot_ratios(results, plot_path, title)


kernels_app = typer.Typer(
    help="The fused C++ kernels: compile them ahead of time, or see where they are cached.",
    no_args_is_help=True,
    cls=PlainGroup,
    rich_markup_mode="markdown",
)


@kernels_app.command("build", cls=PlainCommand)
def kernels_build() -> None:
    """Compile the fused kernels now (once per machine and torch version, ~15-60 s)."""
    from .kernels.__main__ import build

    raise typer.Exit(build())


@kernels_app.command("status", cls=PlainCommand)
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
