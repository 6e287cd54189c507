"""The results report command: train (or reuse) every experiment and write the report."""

from __future__ import annotations

import fnmatch
import os
import platform
from pathlib import Path
from typing import Annotated, Any

import typer

from training.commands.options import CliError, config_options
from training.config import TrainConfig
from training.report import DATASETS, SUITES, plan, run_all, run_status, write_report


@config_options(TrainConfig, "train", only=("max_iters", "eval_every", "patience", "device", "amp"))
def report(
    out: Annotated[
        Path, typer.Option("--out", help="Where report.md, results.csv and figures go.")
    ],
    runs: Annotated[
        Path, typer.Option("--runs", help="Run cache; finished runs are reused.")
    ] = Path("runs/report"),
    data_root: Annotated[
        Path,
        typer.Option("--data-root", envvar="REMI_DATA_ROOT", help="Folder with the real datasets."),
    ] = Path("../shared/data"),
    datasets: Annotated[
        str, typer.Option(help=f"Comma-separated, from: {', '.join(DATASETS)}.")
    ] = ",".join(DATASETS),
    suites: Annotated[
        str, typer.Option(help=f"Comma-separated, from: {', '.join(SUITES)}.")
    ] = ",".join(SUITES),
    machine: Annotated[str, typer.Option(help="Machine description for the report.")] = "",
    only: Annotated[
        str | None, typer.Option(help="Run only rows whose label matches this glob.")
    ] = None,
    train_missing: Annotated[
        bool, typer.Option(help="Train missing runs (--no-train-missing: report finished ones).")
    ] = True,
    dry_run: Annotated[
        bool, typer.Option(help="List the experiments, whether each has run, and stop.")
    ] = False,
    *,
    train_flags: dict[str, Any],
) -> None:
    """Regenerate the results report (tables, CSV, figures) on the real datasets.

    The training flags change every experiment's base settings (e.g. a shorter --max-iters)."""
    if not data_root.is_dir():
        raise CliError(f"--data-root: {data_root} does not exist")
    base = TrainConfig(**train_flags)
    experiments = plan(datasets.split(","), suites.split(","), base)
    if only:
        experiments = [e for e in experiments if fnmatch.fnmatch(e.label, only)]
    unique = {(e.dataset, e.key) for e in experiments}
    typer.echo(f"{len(experiments)} report rows, {len(unique)} distinct runs", err=True)
    if dry_run:
        for e in experiments:
            typer.echo(f"{e.dataset}\t{e.label}\t{run_status(e, runs)}")
        return
    rows = run_all(experiments, data_root, runs, train_missing=train_missing)
    if not rows:
        raise CliError("no finished runs to report")
    path = write_report(rows, out, machine or _machine())
    typer.echo(f"report: {path}")


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({os.cpu_count()} cores, {cpu}), torch {torch.__version__}"
