"""Shared fixtures: a real redis-server and tiny bundles."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import write_tiny_bundle  # also imported from here by test_nightly.py


def _find_redis_server() -> str | None:
    # REMI_TEST_REDIS_SERVER: another binary (a custom build), or a missing path for "absent".
    override = os.environ.get("REMI_TEST_REDIS_SERVER")
    if override is not None:
        return override if Path(override).is_file() else None
    found = shutil.which("redis-server")
    return found or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)


REDIS_SERVER = _find_redis_server()
# Set by scripts/test.sh: a test skipped for want of Redis fails instead, so the documented test
# command never reports success without having run the Redis tests.
REQUIRE_REDIS = os.environ.get("REMI_REQUIRE_REDIS") == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on a fixed port that can be stopped and started again, so tests
    can simulate an outage and the recovery after it. Nothing is persisted."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        if self.running:
            return
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True)


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh, empty redis-server for one test; `.url`, `.stop()`, `.start()`, `.client()`."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- bundles ------------------------------------------------------------------------------------


@pytest.fixture
def tiny_bundle_root(tmp_path: Path) -> Path:
    """A bundle root whose `current` is a tiny bundle (200 items, d=16, K=4, seq_len=10)."""
    root = tmp_path / "bundles"
    write_tiny_bundle(root, seed=0)
    return root


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_REDIS and report.skipped and "redis" in str(report.longrepr).lower():
        report.outcome = "failed"
        report.longrepr = (
            f"skipped for want of Redis ({report.longrepr}), but REMI_REQUIRE_REDIS=1 "
            "(scripts/test.sh): install redis-server (sh scripts/ensure-redis.sh)"
        )


def pytest_configure(config: pytest.Config) -> None:
    # Starlette nudges towards httpx2 for TestClient; httpx is what this project ships with.
    config.addinivalue_line("filterwarnings", "ignore:Using `httpx` with `starlette.testclient`")
