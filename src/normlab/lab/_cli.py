"""``normlab lab``: list, run, report and check the experiments."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from .data import DATASETS, FILE_DATASETS, DatasetError
from .store import LabWarning, StoreError

lab_app = typer.Typer(
    help="Reproduce the papers' claims on real data: run, report, check.", no_args_is_help=True
)

OutOption = Annotated[Path, typer.Option("--out", help="Results folder.")]


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _error(exc: Exception) -> typer.Exit:
    """Print ``exc`` as the command's error; the exit (status 2) to raise."""
    from rich.markup import escape

    _console().print(f"[red]error:[/red] {escape(str(exc))}")
    return typer.Exit(2)


@contextmanager
def _lab_warnings(console: Any = None) -> Iterator[list[str]]:
    """Print each :class:`LabWarning` (a damaged or foreign file skipped) once, as it happens, on
    ``console`` (default: stderr); yields the list of their texts."""
    from rich.markup import escape

    console, seen = console or _console(), []
    with warnings.catch_warnings():
        warnings.simplefilter("default", LabWarning)
        show = warnings.showwarning

        def print_lab_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            if not issubclass(category, LabWarning):
                return show(message, category, *args, **kwargs)
            seen.append(str(message))
            console.print(f"[yellow]warning:[/yellow] {escape(str(message))}")

        warnings.showwarning = print_lab_warning
        yield seen


def _claims_table(records: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .report import _HEAD, claims_rows

    table = Table(title="claims")
    for h in _HEAD:
        table.add_column(h, overflow="fold")
    for row in claims_rows(records):
        style = "green" if row[-1] == "PASS" else "red"
        table.add_row(*map(escape, row[:-1]), f"[{style}]{escape(row[-1])}[/{style}]")
    Console().print(table)


@lab_app.command("list")
def list_experiments() -> None:
    """One experiment per line: name, paper, estimated minutes (quick / full, digits, 2 cores)."""
    from .experiments import REGISTRY

    for exp in REGISTRY.values():
        typer.echo(
            f"{exp.name:<22} {exp.paper:<45} ~{exp.minutes_quick:g} min quick / ~{exp.minutes_full:g} min full"
        )


@lab_app.command()
def run(
    names: Annotated[list[str], typer.Argument(help="Experiment names, or 'all'.")],
    quick: Annotated[
        bool,
        typer.Option(
            help="Fewer seeds (3), the quick configuration, and a fixed 5k-sample training subset on "
            "fashion-mnist, mnist and cifar10."
        ),
    ] = False,
    dataset: Annotated[str, typer.Option(help=f"One of: {', '.join(DATASETS)}.")] = "digits",
    data_dir: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help=f"Folder with the files of {', '.join(FILE_DATASETS)} (the only folder read).",
        ),
    ] = None,
    seeds: Annotated[
        int | None, typer.Option(min=1, help="Number of seeds (default 3 quick, 5 full).")
    ] = None,
    out: OutOption = Path("runs"),
    force: Annotated[bool, typer.Option(help="Rerun units that already have results.")] = False,
    threads: Annotated[
        int,
        typer.Option(
            min=0,
            help="torch intra-op threads; 0 (default) keeps torch's default, one per core. On 2 cores the "
            "digits quick suite takes ~140 s with 2 threads and ~170 s with 1; use 1 on a machine shared "
            "with other jobs.",
        ),
    ] = 0,
) -> None:
    """Run experiments; finished units are skipped (resume after an interruption with the same command).

    Several processes may run on the same --out at once (one machine, or a Slurm job array on a
    shared filesystem): each unit is claimed before it is trained, so none is trained twice.
    """
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .experiments import REGISTRY
    from .runner import load_claims, run_suite
    from .store import check_results_folder

    chosen = list(REGISTRY) if names == ["all"] else names
    unknown = [n for n in chosen if n not in REGISTRY]
    if unknown:
        raise typer.BadParameter(f"unknown experiment(s) {unknown}; `normlab lab list` shows them")
    if dataset not in DATASETS:
        raise typer.BadParameter(
            f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}"
        )
    if data_dir is not None and dataset not in FILE_DATASETS:
        raise typer.BadParameter(
            f"--data-dir is only read for {', '.join(FILE_DATASETS)}; {dataset} is built in"
        )
    try:
        check_results_folder(out)
    except StoreError as exc:
        raise _error(exc) from exc
    if threads:
        torch.set_num_threads(threads)
    seed_list = list(range(seeds if seeds is not None else (3 if quick else 5)))
    console = _console()
    tty = sys.stderr.isatty()
    start = time.perf_counter()
    with (
        _lab_warnings(console),
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} units"),
            TimeElapsedColumn(),
            console=console,
            disable=not tty,
        ) as bar,
    ):
        tasks = {
            name: bar.add_task(
                name,
                total=len(REGISTRY[name].configs(quick=quick, seeds=seed_list, dataset=dataset)),
            )
            for name in chosen
        }

        def waiting(name: str, cfg: dict[str, Any], owner: str) -> None:
            console.print(f"{name}: waiting for a unit claimed by {escape(owner)}")

        try:
            for exp, claims in run_suite(
                chosen,
                dataset,
                seeds=seed_list,
                quick=quick,
                out=out,
                data_dir=data_dir,
                force=force,
                on_unit=lambda name, _: bar.advance(tasks[name]),
                on_wait=waiting,
            ):
                verdict = (
                    ", ".join(f"{c.claim.name} {'PASS' if c.passed else 'FAIL'}" for c in claims)
                    or "report only"
                )
                if not tty:
                    console.print(f"{exp.name}: {verdict} ({time.perf_counter() - start:.1f} s)")
        except (DatasetError, StoreError) as exc:
            raise _error(exc) from exc
        records = load_claims(out, experiments=chosen, dataset=dataset)
    _claims_table(records)
    console.print(
        f"{len(chosen)} experiment(s) in {time.perf_counter() - start:.0f} s; results in {out}/"
    )


@lab_app.command()
def report(
    out: OutOption = Path("runs"),
    to: Annotated[
        Path | None,
        typer.Option(
            file_okay=False,
            help="Write the report (and a copy of the results it shows) in this folder instead of "
            "--out, e.g. when --out is read-only.",
        ),
    ] = None,
) -> None:
    """Write <out>/report.md and a self-contained <out>/report.html (claims table first, then each
    experiment). Damaged or foreign result files are skipped, with a warning naming each."""
    from .report import write_report
    from .runner import copy_results

    try:
        with _lab_warnings():
            if to is not None and to.resolve() != out.resolve():
                copy_results(out, to)
            md, page = write_report(to or out)
    except (FileNotFoundError, StoreError) as exc:
        raise _error(exc) from exc
    except PermissionError as exc:
        raise _error(
            StoreError(f"cannot write the report: {exc}; pass --to DIR to write it elsewhere")
        ) from exc
    typer.echo(f"report: {md}\nreport: {page}")


@lab_app.command()
def check(out: OutOption = Path("runs")) -> None:
    """Exit 0 when every claim under --out passes, 1 when any fails, 2 when no experiment ran or
    some results are damaged (each skipped file is named; claims are checked against their units'
    results)."""
    from .runner import load_claims

    try:
        with _lab_warnings() as skipped:
            records = load_claims(out)
    except StoreError as exc:
        raise _error(exc) from exc
    if not records:
        _console().print(
            f"no intact experiment results under {out} ({len(skipped)} skipped)"
            if skipped
            else f"no experiment results under {out}"
        )
        raise typer.Exit(2)
    _claims_table(records)
    failed = sum(not c["passed"] for r in records for c in r["claims"])
    if skipped:
        _console().print(
            f"{len(skipped)} damaged or foreign claims file(s) skipped (see the warnings above): "
            "their claims are not checked"
        )
    raise typer.Exit(1 if failed else 2 if skipped else 0)
