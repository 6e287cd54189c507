"""`remi-serve`: run the service under uvicorn.

Flags override REMI_* environment variables. They are passed on through the environment, because
with --workers > 1 every worker process builds its own app from the environment.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError

if TYPE_CHECKING:
    import uvicorn

app = typer.Typer(add_completion=False, help=__doc__)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _log_config(level: str) -> dict:
    import uvicorn.config

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    # Route the service's own loggers through uvicorn's handler so they appear in its output.
    config["loggers"]["service"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    config["loggers"]["remi_core"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    return config


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.", min=0, max=65535)] = 8000,
    workers: Annotated[
        int,
        typer.Option(
            help="Worker processes, each with its own copy of the bundle, event loop and compute "
            "thread; GET /metrics reports all of them together. When more than one pays: "
            "docs/serving.md.",
            min=1,
            envvar="REMI_WORKERS",
        ),
    ] = 1,
    bundle_root: Annotated[
        Path | None,
        typer.Option(help="Bundle root holding `current` (default: REMI_BUNDLE_ROOT)."),
    ] = None,
    log_level: Annotated[
        str, typer.Option(help="critical, error, warning, info or debug.")
    ] = "info",
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads of each worker (REMI_THREADS; default: the CPUs this process may "
            "use, affinity and cgroup quota, shared out among the workers). Torch in a compute "
            "thread uses REMI_TORCH_THREADS of them (0: all); faiss's index search all of them."
        ),
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            help="Load and verify the bundle before starting the workers, so that start-up "
            "stops with one clear message when none can serve (instead of every worker failing). "
            "When `current` cannot, the workers serve an older published version that can."
        ),
    ] = True,
) -> None:
    """Serve recommendations over HTTP."""
    if log_level.lower() not in LOG_LEVELS:
        typer.secho(f"error: --log-level must be one of {', '.join(LOG_LEVELS)}", err=True)
        raise typer.Exit(code=2)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:  # uvicorn would log "Name or service not known" alone
        typer.secho(f"error: --host {host}: no such address ({exc.strerror})", err=True)
        raise typer.Exit(code=2) from None
    if bundle_root is not None:
        os.environ["REMI_BUNDLE_ROOT"] = str(bundle_root)
    _share_threads(threads, workers)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    # faiss announces at INFO which CPU build it tried; that is noise in service logs.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from service.settings import Settings, describe_error

    try:
        settings = Settings()
    except ValidationError as exc:
        typer.echo(f"error: invalid settings:\n{describe_error(exc)}", err=True)
        raise typer.Exit(2) from None

    if workers > 1 and settings.reload_interval_s == 0:
        typer.echo(
            "warning: with REMI_RELOAD_INTERVAL_S=0, POST /admin/reload reloads only the worker "
            "that answers it; the other workers keep serving the old bundle",
            err=True,
        )
    _bind_once(host, port)  # before the bundle check, which takes seconds
    if check:
        from remi_core.bundle import BundleError
        from service.registry import load_servable

        try:
            # As a worker loads it (REMI_EXACT_SEARCH may pick a search the bundle fails),
            # but on the CPU: the check's copy of the model is let go before the workers start.
            model, _, rejected = load_servable(
                settings.bundle_root, "cpu", settings.verify_checksums, settings.exact_search
            )
        except (BundleError, OSError) as exc:
            typer.echo(f"error: cannot start: no usable bundle: {exc}", err=True)
            raise typer.Exit(1) from None
        if rejected is not None:
            typer.echo(
                f"warning: `current` cannot serve, so the workers start on {model.version}, an "
                f"older published version that can: {rejected}",
                err=True,
            )
        typer.echo(f"bundle {model.version} verified ({model.num_items} items)", err=True)
        del model

    import uvicorn

    options = {
        "factory": True,
        "host": host,
        "port": port,
        "workers": workers,
        "log_level": log_level.lower(),
        "log_config": _log_config(log_level),
        # Without it uvicorn waits for every connection to close, however long a client takes.
        "timeout_graceful_shutdown": settings.graceful_shutdown_s,
    }
    with _shared_metrics(workers):
        if workers == 1:
            uvicorn.run("service.app:create_app", **options)
        else:
            _run_workers(uvicorn.Config("service.app:create_app", **options))


@contextlib.contextmanager
def _shared_metrics(workers: int) -> Iterator[None]:
    """With several workers, a directory where each writes its metrics, so that GET /metrics
    answers for all of them (service/metrics.py): PROMETHEUS_MULTIPROC_DIR if set (emptied of
    an earlier run's files first), else a temporary directory removed at exit."""
    from service.metrics import MULTIPROC_ENV

    given = os.environ.get(MULTIPROC_ENV)
    if workers == 1 and not given:
        yield
        return
    if given:
        path = Path(given)
        try:
            path.mkdir(parents=True, exist_ok=True)
            for stale in path.glob("*.db"):
                stale.unlink()
            _check_room_for_metrics(path, workers)
        except OSError as exc:
            typer.echo(f"error: {MULTIPROC_ENV}={given} is not a usable directory: {exc}", err=True)
            raise typer.Exit(2) from None
        yield
        return
    _remove_orphaned_metrics()
    with tempfile.TemporaryDirectory(prefix=f"{METRICS_TMP_PREFIX}{os.getpid()}-") as tmp:
        try:
            _check_room_for_metrics(Path(tmp), workers)
        except OSError as exc:
            typer.echo(
                f"error: the metrics directory {tmp} is not usable ({exc}); set {MULTIPROC_ENV} "
                "to a directory with room",
                err=True,
            )
            raise typer.Exit(2) from None
        os.environ[MULTIPROC_ENV] = tmp
        try:
            yield
        finally:
            del os.environ[MULTIPROC_ENV]


# Room each worker's metrics files need at first: three files (counters, histograms, gauges)
# of 64 KiB, allocated (service/metrics.py, BackedMmapedDict); twice that, for growth.
METRICS_ROOM_PER_WORKER = 2 * 3 * (1 << 16)


def _check_room_for_metrics(path: Path, workers: int) -> None:
    """OSError unless every worker can create and fill its metrics files in `path`: a worker
    that cannot fails in create_app, which uvicorn's supervisor restarts for ever. Allocating
    the room once (then freeing it) finds a full disk, which an empty file did not."""
    with tempfile.TemporaryFile(dir=path) as probe:
        try:
            os.posix_fallocate(probe.fileno(), 0, workers * METRICS_ROOM_PER_WORKER)
        except OSError as exc:
            room = f"{workers * METRICS_ROOM_PER_WORKER // 1024} KiB"
            raise OSError(f"no room for {workers} workers' metrics files ({room}): {exc}") from None


METRICS_TMP_PREFIX = "remi-metrics-"


def _remove_orphaned_metrics() -> None:
    """Delete the metrics directories of earlier remi-serve processes that are gone without
    removing theirs (SIGKILL, the OOM killer): named after their pid, and ours to delete. One
    named after our own pid is an earlier run's too (a restarted container reuses pids)."""
    for path in Path(tempfile.gettempdir()).glob(f"{METRICS_TMP_PREFIX}*-*"):
        pid = path.name.removeprefix(METRICS_TMP_PREFIX).partition("-")[0]
        try:
            if not pid.isdigit() or path.stat().st_uid != os.getuid():
                continue
            if int(pid) == os.getpid():
                raise ProcessLookupError  # not alive as the run that made it
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # alive under another user (EPERM), or the path just went
            continue


class _WorkerSocket(socket.socket):
    """The socket uvicorn's supervisor hands every worker: the parent's copy only holds the port
    (bound, never listening), and each worker that unpickles it binds a socket of its own to the
    same address with SO_REUSEPORT. uvicorn listens on it once the worker's lifespan has loaded
    the bundle, so the kernel deals each new connection to one of the ready workers, by a hash of
    the connection's addresses.

    Why not uvicorn's one shared socket: each worker's event loop (libuv, under uvloop) accepts
    whatever is pending when it wakes, so 16 clients connecting at once were split 16/0, 15/1
    and 14/2 in three tries, and still 16/0 in one of four with UV_TCP_SINGLE_ACCEPT=1 (at 1M
    items: 737 req/s against 1,186-1,244 when both workers had connections), one worker doing
    all the work for as long as the connections live.
    """

    def __reduce__(self) -> tuple:
        return _bind_reusing_port, (self.family, self.getsockname())


def _bind_reusing_port(
    family: socket.AddressFamily, address: tuple, cls: type[socket.socket] = socket.socket
) -> socket.socket:
    """A TCP socket of type `cls` bound to `address` with SO_REUSEPORT, not yet listening."""
    sock = cls(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bind_once(host: str, port: int) -> tuple:
    """Bind the address plainly and let it go: the address bound, or exit 1 saying why it
    cannot be (uvicorn alone says so only after the bundle has loaded, in its own words)."""
    try:
        with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            return probe.getsockname()
    except OSError as exc:
        typer.echo(f"error: cannot listen on {host}:{port}: {exc}", err=True)
        raise typer.Exit(1) from None


def _run_workers(config: uvicorn.Config) -> None:
    """uvicorn's supervisor (restarts a worker that dies, stops them all on SIGINT/SIGTERM) over
    one listening socket per worker (`_WorkerSocket`)."""
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    family = _family(config.host)
    # A plain bind first: with SO_REUSEPORT alone this server would join one already listening
    # on the port with it (a remi-serve still running) and share its traffic.
    address = _bind_once(config.host, config.port)  # the port chosen, for --port 0
    try:
        reserved = _bind_reusing_port(family, address, _WorkerSocket)
    except OSError as exc:
        typer.echo(f"error: cannot listen on {config.host}:{config.port}: {exc}", err=True)
        raise typer.Exit(1) from None
    shown = f"[{config.host}]" if family == socket.AF_INET6 else config.host
    logging.getLogger("uvicorn.error").info(
        "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", shown, address[1]
    )

    class Supervisor(Multiprocess):
        """uvicorn's, noting whether a signal told it to stop; else a worker failed to start."""

        told_to_stop = False

        def handle_int(self) -> None:
            self.told_to_stop = True
            super().handle_int()

        def handle_term(self) -> None:
            self.told_to_stop = True
            super().handle_term()

    supervisor = Supervisor(config, sockets=[reserved])
    with reserved:
        supervisor.run()
    if not supervisor.told_to_stop:
        # uvicorn's supervisor stops every worker when one fails its start-up (a replacement
        # that finds no usable bundle, say) and returns as it does after SIGTERM; exit 0 would
        # read as a deliberate stop to a restart policy (`on-failure`): the service stays down.
        typer.echo("error: a worker failed to start, so all were stopped (see its log)", err=True)
        raise typer.Exit(STARTUP_FAILURE)


def _share_threads(threads: int | None, workers: int) -> None:
    """Give every worker its thread count through REMI_THREADS (workers read the environment):
    the flag or REMI_THREADS as given, else the CPUs available divided among the workers."""
    from remi_core.threads import THREADS_ENV, ThreadSettingError, available_cpus, resolve_threads

    try:
        count, source = resolve_threads(threads)
    except ThreadSettingError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if source == "cpus available":
        count = max(1, available_cpus() // workers)
    os.environ[THREADS_ENV] = str(count)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
