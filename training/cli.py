"""`remi-train`: prepare data, train, evaluate, export and publish REMI bundles.

Settings can come from a config file (`--config`, JSON, YAML or TOML with optional `data:`,
`train:`, `export:` and `nightly:` sections); flags given on the command line override it.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any

import typer
from redis.exceptions import RedisError
from typer.core import TyperGroup

from remi_core.bundle import BundleError
from remi_core.threads import setup_threads
from training.commands import bundles, nightly, report, train
from training.commands.options import CliError
from training.data import DataError
from training.nightly import LockHeld, NightlyError
from training.run_dir import RunError

LOCK_HELD_EXIT = 3

# Expected failures and their exit codes, checked in order (the first match wins); anything
# else is a bug and keeps its traceback.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (LockHeld, LOCK_HELD_EXIT),  # another nightly run holds the lock
    (CliError, 2),  # a bad flag, argument or config file
    (DataError, 2),  # input data that cannot become a dataset
    (RunError, 2),  # a run directory that is not a (finished) run
    (BundleError, 2),  # a bundle that is missing, corrupt or inconsistent
    (NightlyError, 2),  # the nightly job cannot run as configured
    (RedisError, 2),  # Redis unreachable or failing
    (OSError, 2),  # a missing or unwritable file or directory, a full disk
    (ValueError, 2),  # settings a config class or the trainer rejects (e.g. no CUDA)
)


def exit_code(exc: BaseException) -> int | None:
    """The exit code of an expected failure; None for anything else."""
    return next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), None)


class _Commands(TyperGroup):
    """Every command runs through here: an expected failure becomes one red line and its exit
    code, whether the app runs as `remi-train` (main) or under typer's CliRunner in tests."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            code = exit_code(exc)
            if code is None:
                raise
            prefix = "Redis failed: " if isinstance(exc, RedisError) else ""
            typer.secho(f"error: {prefix}{exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(code=code) from None


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, help=__doc__)


@app.callback()
def _threads(
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help="CPU threads of torch and faiss (default: REMI_THREADS, else the CPUs this "
            "process may use: affinity and cgroup quota). Give it before the command.",
        ),
    ] = None,
) -> None:
    # Every command sizes its pools before any work (the wait policy was set on import);
    # a bad value is a ThreadSettingError, a ValueError, so it exits 2 like any bad setting.
    setup_threads(threads)


app.command()(train.prepare)
app.command("train")(train.train_command)
app.command()(train.evaluate)
app.command()(train.export)
app.command()(nightly.nightly)
app.command()(nightly.bootstrap)
app.command()(bundles.versions)
app.command()(bundles.rollback)
app.command()(report.report)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
