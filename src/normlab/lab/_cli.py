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
    """The claims (then the sanity checks) as compact rich tables on stdout (the report has every column)."""
    from rich.console import Console
    from rich.table import Table

    from .experiments._common import num
    from .report import check_rows

    styles = {"confirmed": "green", "refuted": "red", "inconclusive": "yellow"}
    console = Console()
    rows = check_rows(records)
    for kind, title in (("claim", "claims"), ("sanity", "sanity checks (hold by construction)")):
        chosen = [r for r in rows if r["kind"] == kind]
        if not chosen:
            continue
        table = Table(title=title)
        for h in ("experiment", "dataset", "claim", "n", "estimate", "95 % interval", "threshold"):
            table.add_column(h, overflow="fold")
        table.add_column("verdict", no_wrap=True)
        for r in chosen:
            lo = num(r["ci_low"]) if r["ci_low"] is not None else "−∞"
            hi = num(r["ci_high"]) if r["ci_high"] is not None else "∞"
            style = styles.get(r["verdict"], "white")
            table.add_row(
                r["experiment"],
                r["dataset"],
                r["claim"],
                str(r["n"]),
                num(r["estimate"]),
                f"[{lo}, {hi}]",
                f"{r['op']} {num(r['threshold'])}",
                f"[{style}]{r['verdict']}[/{style}]",
            )
        console.print(table)


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
            help="Fewer seeds (5), the quick configuration, and a fixed 5k-sample training subset on "
            "fashion-mnist, mnist and cifar10."
        ),
    ] = False,
    dataset: Annotated[str, typer.Option(help=f"One of: {', '.join(DATASETS)}.")] = "digits",
    data_dir: Annotated[Path | None, typer.Option(help="Folder with IDX / CIFAR-10 files.")] = None,
    seeds: Annotated[
        int | None, typer.Option(min=1, help="Number of seeds (default 5 quick, 10 full).")
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

    from .experiments import FULL_SEEDS, QUICK_SEEDS, REGISTRY
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
    seed_list = list(range(seeds if seeds is not None else (QUICK_SEEDS if quick else FULL_SEEDS)))
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
            verdict = ", ".join(f"{c.claim.name} {c.verdict}" for c in claims) or "report only"
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
def check(
    out: OutOption = Path("runs"),
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print a JSON list, one object per claim: experiment, claim, kind, dataset, n, "
            "estimate, ci_low, ci_high, threshold, op, paper_value, verdict (null for a missing or "
            "infinite number).",
        ),
    ] = False,
) -> None:
    """Exit 0 when every claim (kind "claim") under --out is confirmed, 1 when any is refuted or
    inconclusive (or a claims file cannot be read), 2 when no experiment ran. Sanity checks are
    listed but do not count."""
    import json

    from .report import check_rows, usable
    from .runner import load_claims

    records, skipped = usable(load_claims(out))
    for reason in skipped:
        _console().print(f"skipped: {reason}")
    if not records:
        _console().print(f"no experiment results under {out}")
        raise typer.Exit(2)
    rows = check_rows(records)
    if as_json:
        typer.echo(json.dumps(rows, indent=1, ensure_ascii=False, allow_nan=False))
    else:
        _claims_table(records)
    failed = [r for r in rows if r["kind"] == "claim" and r["verdict"] != "confirmed"]
    raise typer.Exit(1 if failed or skipped else 0)
