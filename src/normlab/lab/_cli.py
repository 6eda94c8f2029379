"""``normlab lab``: list, run, report and check the experiments."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from .data import DATASETS, DatasetError

lab_app = typer.Typer(
    help="Reproduce the papers' claims on real data: run, report, check.", no_args_is_help=True
)

OutOption = Annotated[Path, typer.Option("--out", help="Results folder.")]


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _claims_table(records: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    from .report import _HEAD, claims_rows

    table = Table(title="claims")
    for h in _HEAD:
        table.add_column(h, overflow="fold")
    for row in claims_rows(records):
        style = "green" if row[-1] == "PASS" else "red"
        table.add_row(*row[:-1], f"[{style}]{row[-1]}[/{style}]")
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
    data_dir: Annotated[Path | None, typer.Option(help="Folder with IDX / CIFAR-10 files.")] = None,
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
    """Run experiments; finished units are skipped (resume after an interruption with the same command)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .experiments import REGISTRY
    from .runner import load_claims, run_experiment

    chosen = list(REGISTRY) if names == ["all"] else names
    unknown = [n for n in chosen if n not in REGISTRY]
    if unknown:
        raise typer.BadParameter(f"unknown experiment(s) {unknown}; `normlab lab list` shows them")
    if dataset not in DATASETS:
        raise typer.BadParameter(
            f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}"
        )
    if threads:
        torch.set_num_threads(threads)
    seed_list = list(range(seeds if seeds is not None else (3 if quick else 5)))
    console = _console()
    tty = sys.stderr.isatty()
    start = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} units"),
        TimeElapsedColumn(),
        console=console,
        disable=not tty,
    ) as bar:
        for name in chosen:
            exp = REGISTRY[name]
            total = len(exp.configs(quick=quick, seeds=seed_list, dataset=dataset))
            task = bar.add_task(name, total=total)
            t0 = time.perf_counter()
            try:
                claims = run_experiment(
                    exp,
                    dataset,
                    seeds=seed_list,
                    quick=quick,
                    out=out,
                    data_dir=data_dir,
                    force=force,
                    on_unit=lambda *_, t=task: bar.advance(t),
                )
            except DatasetError as exc:
                console.print(f"[red]error:[/red] {exc}")
                raise typer.Exit(2) from exc
            verdict = (
                ", ".join(f"{c.claim.name} {'PASS' if c.passed else 'FAIL'}" for c in claims)
                or "report only"
            )
            if not tty:
                console.print(f"{name}: {verdict} ({time.perf_counter() - t0:.1f} s)")
    records = [r for r in load_claims(out) if r["experiment"] in chosen and r["dataset"] == dataset]
    _claims_table(records)
    console.print(
        f"{len(chosen)} experiment(s) in {time.perf_counter() - start:.0f} s; results in {out}/"
    )


@lab_app.command()
def report(out: OutOption = Path("runs")) -> None:
    """Write <out>/report.md and a self-contained <out>/report.html (claims table first, then each experiment)."""
    from .report import write_report

    try:
        md, page = write_report(out)
    except FileNotFoundError as exc:
        _console().print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    typer.echo(f"report: {md}\nreport: {page}")


@lab_app.command()
def check(out: OutOption = Path("runs")) -> None:
    """Exit 0 when every claim under --out passes, 1 when any fails, 2 when no experiment ran."""
    from .runner import load_claims

    records = load_claims(out)
    if not records:
        _console().print(f"no experiment results under {out}")
        raise typer.Exit(2)
    _claims_table(records)
    failed = sum(not c["passed"] for r in records for c in r["claims"])
    raise typer.Exit(1 if failed else 0)
