"""Several workers: with `remi-serve --workers 2`, every worker serves a publish within 1 s, and
GET /metrics counts every worker's requests whichever worker answers."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import typer
import uvicorn
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from remi_core.bundle import current_version, resolve_current, set_current
from service.app import create_app
from service.cli import _run_workers, _shared_metrics, _WorkerSocket
from service.cli import app as cli_app
from service.metrics import MULTIPROC_ENV, Metrics
from service.settings import Settings
from tests.helpers import (
    child_env,
    dead_redis_url,
    remi_serve,
    tiny_item_ids,
    write_tiny_bundle,
)


def readyz(base: str) -> tuple[int, str]:
    # A new connection per request, so the kernel can hand it to either worker.
    with httpx.Client(timeout=5) as client:
        body = client.get(f"{base}/readyz").json()
    return body["worker_pid"], body["model_version"]


@contextlib.contextmanager
def two_workers(bundle_root: Path, log_path: Path) -> Iterator[tuple[str, int, set[int]]]:
    """A real `remi-serve --workers 2` -> (base URL, port, the two worker pids once both answer)."""
    args = ["--bundle-root", str(bundle_root), "--log-level", "warning"]
    env = child_env(REMI_REDIS_URL=dead_redis_url())  # history-free: Redis plays no part here
    with remi_serve(args, log_path, env, workers=2) as served:
        yield served.base, served.port, served.pids


@pytest.mark.integration
def test_every_worker_serves_a_publish_within_a_second(tiny_bundle_root: Path, tmp_path: Path):
    old = current_version(tiny_bundle_root)
    with two_workers(tiny_bundle_root, tmp_path / "serve.log") as (base, port, pids):
        assert {readyz(base)[1] for _ in range(4)} == {old}
        # Connections opened together, as a load generator opens them, reach both workers.
        assert set(pids_answering_at_once(port, 32)) == pids

        new = write_tiny_bundle(tiny_bundle_root, seed=1).name  # publishes: `current` moves
        published = time.monotonic()
        late: dict[int, list[str]] = defaultdict(list)  # pid -> versions answered after 1 s
        while set(late) != pids:
            assert time.monotonic() - published < 30, f"only {set(late)} answered after 1 s"
            sent = time.monotonic()
            pid, version = readyz(base)
            if sent - published > 1.0:
                late[pid].append(version)
            time.sleep(0.02)  # leave the two cores to the workers' reloads
        assert {pid: set(versions) for pid, versions in late.items()} == {
            pid: {new} for pid in pids
        }

        ids = tiny_item_ids()[1:]
        for i in range(12):  # a new connection each: both workers answer some
            with httpx.Client(timeout=5) as client:
                r = client.post(f"{base}/recommend", json={"history": [ids[i]]})
            assert r.status_code == 200, r.text
        answered = 'remi_http_requests_total{endpoint="/recommend",method="POST",status="200"}'
        for _ in range(6):  # new connections again: either worker may answer the scrape
            with httpx.Client(timeout=5) as client:
                text = client.get(f"{base}/metrics").text
            assert f"{answered} 12.0" in text
            assert f'remi_model_info{{version="{new}"}} 1.0' in text
            assert f'remi_model_info{{version="{old}"}} 0.0' in text


@pytest.mark.integration
@pytest.mark.parametrize("current_rejected", [False, True])
def test_a_worker_that_dies_is_replaced_on_a_socket_of_its_own(
    tiny_bundle_root: Path, tmp_path: Path, current_rejected: bool
) -> None:
    log_path = tmp_path / "serve.log"
    served = current_version(tiny_bundle_root)
    with two_workers(tiny_bundle_root, log_path) as (base, port, pids):
        if current_rejected:
            # Dying while `current` names a rejected bundle: the new worker failing to start
            # made uvicorn's supervisor stop the survivor too, and the whole service was gone.
            # Damaged before it is published: the pollers must never see it whole.
            bad = write_tiny_bundle(tiny_bundle_root, seed=2, publish=False)
            (bad / "item_ids.json").write_text('[null, "oops"]')  # fails its checksum
            set_current(tiny_bundle_root, bad.name)
            with httpx.Client(timeout=5) as client:
                wait_for(
                    lambda: all(
                        client.get(f"{base}/readyz").json()["reload"]["rejected_target"] == bad.name
                        for _ in range(8)
                    )
                )
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:  # uvicorn's supervisor starts a new worker; it answers once it has loaded
            assert time.monotonic() < deadline, log_path.read_text()
            try:
                answering = set(pids_answering_at_once(port, 16))
            except (OSError, ValueError):  # reset: queued on the victim's socket as it closed
                continue
            assert victim not in answering
            if len(answering) == 2:
                break
            time.sleep(0.2)
        assert len(answering - pids) == 1  # the survivor and the new worker
        assert set(pids_answering_at_once(port, 32)) == answering
        assert {readyz(base)[1] for _ in range(8)} == {served}


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux's")
def test_workers_stop_when_the_supervisor_is_killed(tiny_bundle_root: Path, tmp_path: Path):
    # SIGKILL leaves the supervisor no time to stop its workers: they used to keep serving,
    # unsupervised, and hold the port, so a new remi-serve could not start.
    with two_workers(tiny_bundle_root, tmp_path / "serve.log") as (base, port, pids):
        [supervisor] = parents(pids)
        os.kill(supervisor, signal.SIGKILL)
        wait_for(lambda: not any(running(pid) for pid in pids))
        with socket.socket() as probe:  # the port is free again
            probe.bind(("127.0.0.1", port))


def parents(pids: set[int]) -> set[int]:
    """The parent pid of each of `pids` (from /proc)."""
    return {int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) for pid in pids}


def running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (the reaper of an orphan may be slow)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_poller_reloads_on_a_move_and_tries_a_rejected_bundle_once(tiny_bundle_root: Path):
    settings = Settings(
        bundle_root=tiny_bundle_root, redis_url=dead_redis_url(), reload_interval_s=0.05
    )
    with TestClient(create_app(settings)) as client:
        good = write_tiny_bundle(tiny_bundle_root, seed=1).name
        wait_for(lambda: client.get("/readyz").json()["model_version"] == good)
        bad = write_tiny_bundle(tiny_bundle_root, seed=2, publish=False)
        (bad / "item_ids.json").write_text('[null, "oops"]')  # fails its checksum
        set_current(tiny_bundle_root, bad.name)  # damaged first: never seen whole
        wait_for(lambda: client.get("/readyz").json()["reload"]["rejected_target"] == bad.name)
        time.sleep(0.5)  # about ten more polls, none of which may load it again
        assert client.get("/readyz").json()["model_version"] == good
        metrics = client.get("/metrics").text
        assert 'remi_model_reloads_total{result="failure"} 1.0' in metrics
        assert 'remi_model_reloads_total{result="success"} 1.0' in metrics
        assert resolve_current(tiny_bundle_root) == bad


def test_workers_share_a_metrics_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    with _shared_metrics(1):
        assert MULTIPROC_ENV not in os.environ  # one worker: its own registry
    with _shared_metrics(2):
        made = Path(os.environ[MULTIPROC_ENV])
        assert made.is_dir()
    assert MULTIPROC_ENV not in os.environ and not made.exists()
    given = tmp_path / "metrics"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"from an earlier run")
    monkeypatch.setenv(MULTIPROC_ENV, str(given))
    with _shared_metrics(2):
        assert os.environ[MULTIPROC_ENV] == str(given) and not list(given.iterdir())
    assert given.is_dir()  # the operator's directory stays


def test_a_killed_supervisors_metrics_directory_goes_at_the_next_start(
    tmp_path: Path, monkeypatch
) -> None:
    # SIGKILL (the OOM killer) leaves the supervisor no time to remove its directory.
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    orphaned = tmp_path / f"remi-metrics-{gone}-abc123"
    reused = tmp_path / f"remi-metrics-{os.getpid()}-ghi789"  # a restarted container's pid
    alive = tmp_path / f"remi-metrics-{os.getppid()}-def456"  # a running process's
    other = tmp_path / "remi-metrics-xyz"  # not named by a pid
    for path in (orphaned, reused, alive, other):
        path.mkdir()
        (path / "counter_1.db").write_bytes(b"")
    with _shared_metrics(2):
        made = Path(os.environ[MULTIPROC_ENV])
        assert made.name.startswith(f"remi-metrics-{os.getpid()}-")
    assert not orphaned.exists() and not reused.exists() and alive.exists() and other.exists()
    assert not made.exists()


def test_a_dead_workers_gauges_leave_the_metrics(tmp_path: Path, monkeypatch) -> None:
    """A worker killed without stopping (SIGKILL, OOM) never removes its gauges itself: the
    version it served would show as served forever. Its counters still count."""
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    dead_worker = (
        "import os; from service.metrics import Metrics; m = Metrics(); "
        "m.set_model('v-of-the-dead', 1.0, 10, 4); m.recommendations.inc(7); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", dead_worker], env=child_env(), check=True, timeout=60)
    assert list(tmp_path.glob("gauge_livemax_*.db"))
    text = Metrics().exposition().decode()
    assert "v-of-the-dead" not in text
    assert "remi_recommendations_total 7.0" in text
    assert not list(tmp_path.glob("gauge_livemax_*.db"))


def pids_answering_at_once(port: int, count: int) -> list[int]:
    """worker_pid from GET /readyz over `count` connections, all open before the first request."""
    conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    pids = []
    for conn in conns:
        with conn:
            conn.sendall(b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            response = b"".join(iter(lambda c=conn: c.recv(65536), b""))
            pids.append(json.loads(response.partition(b"\r\n\r\n")[2])["worker_pid"])
    return pids


def test_each_worker_binds_its_own_socket_to_the_reserved_address() -> None:
    reserved = _WorkerSocket(socket.AF_INET, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind(("127.0.0.1", 0))
    # What a worker process gets when uvicorn's supervisor hands it the socket.
    with reserved, pickle.loads(pickle.dumps(reserved)) as own:
        assert own.fileno() != reserved.fileno()
        assert type(own) is socket.socket
        assert own.getsockname() == reserved.getsockname()
        assert own.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1


def test_several_workers_refuse_a_port_in_use(capsys) -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # e.g. a remi-serve running
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = uvicorn.Config("service.app:create_app", port=port, workers=2)
        with pytest.raises(typer.Exit) as exit_info:
            _run_workers(config)
    assert exit_info.value.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [1, 2])
def test_remi_serve_refuses_a_port_in_use_before_loading_anything(
    tmp_path: Path, workers: int
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--port", str(port), "--workers", str(workers), "--bundle-root", str(tmp_path)]
        result = CliRunner().invoke(cli_app, args, env={"REMI_REDIS_URL": dead_redis_url()})
    assert result.exit_code == 1, result.output
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "no usable bundle" not in result.output  # refused before the bundle check


def test_remi_serve_warns_when_workers_cannot_follow_a_reload(tmp_path: Path) -> None:
    env = {"REMI_RELOAD_INTERVAL_S": "0"}
    args = ["--workers", "2", "--bundle-root", str(tmp_path / "none"), "--port", "0"]
    result = CliRunner().invoke(cli_app, args, env=env)
    assert result.exit_code == 1  # no bundle there; the warning comes first
    assert "reloads only the worker that answers it" in result.output


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on a 256 KiB tmpfs with no free block left (root only: mount)."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        with contextlib.suppress(OSError), (mount / "filler").open("wb") as filler:
            while True:
                filler.write(b"\0" * 4096)
                filler.flush()
        with contextlib.suppress(OSError), (mount / "filler-bytes").open("wb", 0) as filler:
            while True:
                filler.write(b"\0")
        (mount / "metrics").mkdir()
        yield mount / "metrics"
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.integration
def test_metrics_on_a_full_disk_raise_instead_of_killing_the_worker(full_disk: Path) -> None:
    # prometheus_client's files were sparse and written through mmap: a page the full disk
    # could not back was a SIGBUS, which killed the worker at start-up or at a request with a
    # new label set once the disk had filled (exit 135, no message).
    worker = "from service.metrics import Metrics; Metrics().requests.labels('a', 'b', 'c').inc()"
    env = child_env(**{MULTIPROC_ENV: str(full_disk)})
    done = subprocess.run([sys.executable, "-c", worker], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1, (done.returncode, done.stderr[-500:])
    assert "No space left on device" in done.stderr


@pytest.mark.integration
def test_remi_serve_refuses_a_metrics_directory_without_room(
    full_disk: Path, tiny_bundle_root: Path
) -> None:
    # An empty probe file needs no block, so the start-up check passed and every worker then
    # died in create_app, restarted by uvicorn's supervisor for ever.
    env = child_env(**{MULTIPROC_ENV: str(full_disk)}, REMI_REDIS_URL=dead_redis_url())
    args = ["--bundle-root", str(tiny_bundle_root), "--workers", "2", "--port", "0"]
    done = subprocess.run([sys.executable, "-m", "service.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr[-500:]
    assert "no room for 2 workers' metrics files" in done.stderr
    assert "Traceback" not in done.stderr


def test_metrics_files_grow_past_their_first_size(tmp_path: Path) -> None:
    # Grown in blocks allocated first (BackedMmapedDict), on a descriptor of their own: the
    # library's is in append mode, where glibc's fallocate emulation refuses to write.
    worker = (
        "from service.metrics import Metrics; m = Metrics()\n"
        "for i in range(600): m.requests.labels(f'/route-{i}', 'POST', '200').inc()"
    )
    env = child_env(**{MULTIPROC_ENV: str(tmp_path)})
    subprocess.run([sys.executable, "-c", worker], env=env, check=True, timeout=60)
    counters = list(tmp_path.glob("counter_*.db"))
    assert len(counters) == 1 and counters[0].stat().st_size > 1 << 16
    assert counters[0].stat().st_blocks * 512 >= counters[0].stat().st_size  # not sparse
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(MULTIPROC_ENV, str(tmp_path))
        text = Metrics().exposition().decode()
    assert text.count('remi_http_requests_total{endpoint="/route-') == 600
