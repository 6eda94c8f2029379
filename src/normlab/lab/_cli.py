"""``normlab lab``: list, run, report and check the experiments."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from .._cli_support import PlainCommand, PlainGroup
from .data import DATASETS, FILE_DATASETS, DatasetError
from .store import LabWarning, StoreError

lab_app = typer.Typer(
    help="Reproduce the papers' claims on real data: run, report, check.",
    no_args_is_help=True,
    cls=PlainGroup,
    rich_markup_mode="markdown",
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
    """The claims, then the sanity checks, as tables on stdout that fit the terminal (numbers
    never wrap; the report has every column)."""
    from rich.markup import escape
    from rich.table import Table

    from .._cli_support import print_table
    from .experiments._common import num
    from .report import check_rows

    styles = {"confirmed": "green", "refuted": "red", "inconclusive": "yellow"}
    rows = check_rows(records)
    datasets = sorted({r["dataset"] for r in rows})
    on = f" on {', '.join(datasets)}" if datasets else ""
    for kind, title in (("claim", "claims"), ("sanity", "sanity checks (hold by construction)")):
        chosen = [r for r in rows if r["kind"] == kind]
        if not chosen:
            continue
        table = Table(title=title + on, header_style="bold")
        table.add_column("experiment: claim", overflow="fold", ratio=1)
        for h in ("n", "estimate", "95 % interval", "threshold", "verdict"):
            table.add_column(h, no_wrap=True, justify="left" if h == "verdict" else "right")
        for r in chosen:
            lo = num(r["ci_low"]) if r["ci_low"] is not None else "−∞"
            hi = num(r["ci_high"]) if r["ci_high"] is not None else "∞"
            style = styles.get(r["verdict"], "white")
            table.add_row(
                escape(f"{r['experiment']}: {r['claim']}"),
                str(r["n"]),
                num(r["estimate"]),
                f"[{lo}, {hi}]",
                escape(f"{r['op']} {num(r['threshold'])}"),
                f"[{style}]{r['verdict']}[/{style}]",
            )
        print_table(table)


class DatasetName(StrEnum):
    """``--dataset``'s choices (:data:`normlab.lab.data.DATASETS`)."""

    digits = "digits"
    fashion_mnist = "fashion-mnist"
    mnist = "mnist"
    cifar10 = "cifar10"
    synthetic = "synthetic"


class DeviceName(StrEnum):
    """``--device``'s choices."""

    cpu = "cpu"
    cuda = "cuda"


def _complete_experiment(incomplete: str) -> list[str]:
    """Shell completion for experiment names (imports the registry only when asked)."""
    from .experiments import REGISTRY

    return [n for n in (*REGISTRY, "all") if n.startswith(incomplete)]


@lab_app.command("list", cls=PlainCommand)
def list_experiments() -> None:
    """One experiment per line: name, paper, and estimated minutes on digits (2 cores) for a
    quick and a full run."""
    from rich.table import Table

    from .._cli_support import print_table
    from .experiments import REGISTRY

    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("experiment", no_wrap=True)
    table.add_column("paper", overflow="fold")
    table.add_column("quick", justify="right", no_wrap=True)
    table.add_column("full", justify="right", no_wrap=True)
    for exp in REGISTRY.values():
        table.add_row(
            exp.name, exp.paper, f"~{exp.minutes_quick:g} min", f"~{exp.minutes_full:g} min"
        )
    print_table(table)


class _RunDisplay:
    """``lab run``'s progress: a live bar per experiment and an ETA on a terminal; otherwise
    one plain line per finished unit on stdout (name, seconds, units done/total, ETA)."""

    def __init__(self, units: dict[str, tuple[int, float]], console: Any) -> None:
        from .progress import SuiteClock

        self.clock = SuiteClock(units)
        self.units = units
        self.console = console
        self.done = dict.fromkeys(units, 0)
        self.bar: Any = None

    def __enter__(self) -> _RunDisplay:
        from .._cli_support import interactive

        if interactive():
            self.bar = self._live_bar()
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def _live_bar(self) -> Any:
        from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
        from rich.text import Text

        from .progress import format_duration

        clock = self.clock

        class Eta(ProgressColumn):
            def render(self, task: Any) -> Text:
                if not task.fields.get("suite"):
                    return Text("")
                return Text(
                    f"ETA {format_duration(clock.eta())}" if clock.done < clock.total else "done"
                )

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=None),
            TextColumn("{task.fields[count]}", justify="right"),
            Eta(),
            console=self.console,
            expand=True,
        )
        self.tasks = {
            name: bar.add_task(name, total=n, count=f"0/{n}") for name, (n, _) in self.units.items()
        }
        self.suite = bar.add_task("total", total=clock.total, count=f"0/{clock.total}", suite=True)
        return bar

    def _show(self, name: str) -> None:
        if self.bar is None:
            return
        n = self.units[name][0]
        fraction = self.clock.fraction if self.clock.current == name else 0.0
        self.bar.update(
            self.tasks[name], completed=self.done[name] + fraction, count=f"{self.done[name]}/{n}"
        )
        self.bar.update(
            self.suite,
            completed=self.clock.done + self.clock.fraction,
            count=f"{self.clock.done}/{self.clock.total}",
        )

    def start(self, name: str, cfg: dict[str, Any]) -> None:
        self.clock.start(name)
        self._show(name)

    def advance(self, name: str, cfg: dict[str, Any], fraction: float) -> None:
        self.clock.advance(name, fraction)
        self._show(name)

    def finish(self, name: str, cfg: dict[str, Any]) -> None:
        from .progress import format_duration

        seconds = self.clock.finish(name)
        self.done[name] += 1
        self._show(name)
        if self.bar is None:
            took = "already done" if seconds is None else f"{seconds:.1f} s"
            print(
                f"{name}: {took}, {self.clock.done}/{self.clock.total} units, "
                f"ETA {format_duration(self.clock.eta())}",
                flush=True,
            )

    def waiting(self, name: str, cfg: dict[str, Any], owner: str) -> None:
        from rich.markup import escape

        self.console.print(f"{name}: waiting for a unit claimed by {escape(owner)}")


class _Workers:
    """The extra ``lab run`` processes of ``--workers``: stopped if this one stops early;
    :meth:`wait` collects them and fails naming a worker that failed, with its last error line."""

    def __init__(self, procs: list[Any], logs: list[Any]) -> None:
        self.procs, self.logs = procs, logs

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        for log in self.logs:
            log.close()

    def wait(self) -> None:
        failed = []
        for i, (proc, log) in enumerate(zip(self.procs, self.logs), start=2):
            proc.wait()
            if proc.returncode != 0:
                log.seek(0)
                last = log.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
                failed.append(f"worker {i} exited with status {proc.returncode}: {last[0]}")
        if failed:
            raise _error(RuntimeError("; ".join(failed)))


def _start_workers(n: int, args: list[str]) -> _Workers:
    """``n`` more ``normlab lab run`` processes with ``args`` on the same results folder."""
    import subprocess
    import sys
    import tempfile

    # the program this process was started as (`normlab`, `python -m normlab`, or a script that
    # registers experiments of its own before calling the CLI): the command line before its
    # arguments
    program = sys.orig_argv[: len(sys.orig_argv) - (len(sys.argv) - 1)]
    command = [*program, "lab", "run", *args]
    # a pipe could fill and block a worker; closed by _Workers.__exit__
    logs = [tempfile.TemporaryFile() for _ in range(n)]  # noqa: SIM115
    procs = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log) for log in logs]
    return _Workers(procs, logs)


@lab_app.command(cls=PlainCommand)
def run(
    names: Annotated[
        list[str],
        typer.Argument(
            metavar="EXPERIMENT",
            help="Experiment names (`normlab lab list`), or 'all'.",
            autocompletion=_complete_experiment,
            show_default=False,
        ),
    ],
    quick: Annotated[
        bool,
        typer.Option(
            metavar="",
            help="Fewer seeds (5 instead of 10), the quick configuration, and a fixed 5k-sample "
            "training subset on fashion-mnist, mnist and cifar10.",
        ),
    ] = False,
    dataset: Annotated[
        DatasetName,
        typer.Option(metavar="NAME", help=f"The data: {', '.join(DATASETS)}."),
    ] = DatasetName.digits,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            metavar="DIR",
            help=f"Folder with the files of {', '.join(FILE_DATASETS)} (the only folder read).",
        ),
    ] = None,
    seeds: Annotated[
        int | None,
        typer.Option(metavar="N", min=1, help="Number of seeds (default 5 quick, 10 full)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Results folder.")] = Path(
        "runs"
    ),
    force: Annotated[
        bool, typer.Option(metavar="", help="Rerun units that already have results.")
    ] = False,
    threads: Annotated[
        int,
        typer.Option(
            metavar="N",
            min=0,
            help="torch intra-op threads; 0 keeps torch's default, one per core. Use 1 on a "
            "machine shared with other jobs.",
        ),
    ] = 0,
    device: Annotated[
        DeviceName,
        typer.Option(
            metavar="DEVICE",
            help="Where the batched ensembles train: cpu or cuda (each batch is sent there as it "
            "is drawn; data order, noise, probes and results stay on the CPU, so a seed draws the "
            "same batches on both). Without CUDA, cuda exits with status 2 before any work.",
        ),
    ] = DeviceName.cpu,
    workers: Annotated[
        int,
        typer.Option(
            metavar="N",
            min=1,
            help="Train with N processes on this machine (this one and N-1 more, one thread "
            "each unless --threads says otherwise). On 2 cores, 2 workers ran the quick digits "
            "suite in 147 s against 221 s for one process with 2 threads.",
        ),
    ] = 1,
    tune_allocator: Annotated[
        bool,
        typer.Option(
            help="Let glibc keep large blocks in the process (normlab.perf's tune_cpu_allocator): "
            "fresh tensors stop paying page faults; the ConvNet step took half the time.",
        ),
    ] = True,
) -> None:
    """Run experiments; finished units are skipped (resume after an interruption with the same command).

    Several processes may run on the same --out at once (--workers on one machine, or a Slurm
    job array on a shared filesystem): each unit is claimed before it is trained, so none is
    trained twice.
    On a terminal, progress is a live bar per experiment with an ETA; otherwise one line per
    finished unit: name, seconds, units done/total, ETA.
    """
    from .experiments import FULL_SEEDS, QUICK_SEEDS, REGISTRY
    from .runner import load_claims, run_suite
    from .store import check_results_folder

    chosen = list(REGISTRY) if names == ["all"] else names
    unknown = [n for n in chosen if n not in REGISTRY]
    if unknown:
        raise typer.BadParameter(
            f"unknown experiment(s) {unknown}; `normlab lab list` shows them",
            param_hint="'EXPERIMENT...'",
        )
    data_name = DatasetName(dataset).value
    if data_dir is not None and data_name not in FILE_DATASETS:
        raise typer.BadParameter(
            f"--data-dir is only read for {', '.join(FILE_DATASETS)}; {data_name} is built in"
        )
    if DeviceName(device) == DeviceName.cuda and not torch.cuda.is_available():
        raise _error(RuntimeError("--device cuda: no CUDA device is available to torch here"))
    try:
        check_results_folder(out)
    except StoreError as exc:
        raise _error(exc) from exc
    if tune_allocator:
        from ..perf import tune_cpu_allocator

        tune_cpu_allocator()
    if workers > 1:
        threads = threads or 1
    if threads:
        torch.set_num_threads(threads)
    seed_list = list(range(seeds if seeds is not None else (QUICK_SEEDS if quick else FULL_SEEDS)))
    console = _console()
    start = time.perf_counter()
    units = {}
    for name in chosen:
        exp = REGISTRY[name]
        n = len(exp.configs(quick=quick, seeds=seed_list, dataset=data_name))
        minutes = getattr(exp, "minutes_quick" if quick else "minutes_full", None) or 0.5
        units[name] = (n, 60.0 * float(minutes))
    helpers = _start_workers(
        workers - 1,
        [*chosen, "--dataset", data_name, "--out", str(out), "--threads", str(threads)]
        + (["--quick"] if quick else [])
        + (["--force"] if force else [])
        + ([] if seeds is None else ["--seeds", str(seeds)])
        + ([] if data_dir is None else ["--data-dir", str(data_dir)])
        + ["--device", DeviceName(device).value]
        + ([] if tune_allocator else ["--no-tune-allocator"]),
    )
    # the workers first: stopped however the rest of the block ends
    with helpers, _lab_warnings(console), _RunDisplay(units, console) as display:
        try:
            for _ in run_suite(
                chosen,
                data_name,
                seeds=seed_list,
                quick=quick,
                out=out,
                data_dir=data_dir,
                force=force,
                on_unit=display.finish,
                on_wait=display.waiting,
                on_start=display.start,
                on_progress=display.advance,
                device=DeviceName(device).value,
            ):
                pass
        except (DatasetError, StoreError) as exc:
            raise _error(exc) from exc
        helpers.wait()
        records = load_claims(out, experiments=chosen, dataset=data_name)
    _claims_table(records)
    console.print(
        f"{len(chosen)} experiment(s) in {time.perf_counter() - start:.0f} s; results in {out}/"
    )


@lab_app.command(cls=PlainCommand)
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


@lab_app.command(cls=PlainCommand)
def check(
    out: OutOption = Path("runs"),
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            metavar="",
            help="Print a JSON list, one object per claim: experiment, claim, kind, dataset, model "
            "(mlp or cnn), n, "
            "estimate, ci_low, ci_high, threshold, op, paper_value, verdict (null for a missing or "
            "infinite number).",
        ),
    ] = False,
) -> None:
    """Exit 0 when every claim (kind "claim") under --out is confirmed, 1 when any is refuted or
    inconclusive, 2 when no experiment ran or some results are damaged (each skipped file is
    named; claims are checked against their units' results). Sanity checks are listed but do
    not count."""
    import json

    from .report import check_rows
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
    rows = check_rows(records)
    if as_json:
        typer.echo(json.dumps(rows, indent=1, ensure_ascii=False, allow_nan=False))
    else:
        _claims_table(records)
    failed = [r for r in rows if r["kind"] == "claim" and r["verdict"] != "confirmed"]
    if skipped:
        _console().print(
            f"{len(skipped)} damaged or foreign claims file(s) skipped (see the warnings above): "
            "their claims are not checked"
        )
    raise typer.Exit(1 if failed else 2 if skipped else 0)
