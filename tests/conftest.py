"""Fixtures: a real redis-server and tiny bundles (helpers they use live in tests/helpers.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# The service's and the jobs' settings of the shell that runs the tests are not the tests':
# Settings() read them for every field a test leaves out (REMI_MAX_N=5 failed 11 tests). Kept:
# the switches of the tests themselves.
_TEST_SWITCHES = ("REMI_TEST_", "REMI_REQUIRE_REDIS", "REMI_DATA_ROOT")
for _name in [n for n in os.environ if n.startswith("REMI_") and not n.startswith(_TEST_SWITCHES)]:
    del os.environ[_name]
# In-process training here runs with a fixed thread count: with the load follower on
# (remi_core/threads.py), two runs a test compares bit for bit could get different counts, and so
# different sums, whenever something else uses the machine. Subprocess tests that check the
# thread set-up clear this (tests/core/test_threads.py: child_env).
os.environ["REMI_THREADS"] = str(len(os.sched_getaffinity(0)))
# Every server the tests talk to is on this host: a proxy of the shell (HTTP_PROXY) is not.
os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(
    filter(None, ["127.0.0.1,localhost", os.environ.get("NO_PROXY") or os.environ.get("no_proxy")])
)

from tests.helpers import REDIS_SERVER, RedisServer, write_tiny_bundle  # noqa: E402 (after the environment)

# Set by scripts/test.sh: a test skipped for want of Redis fails instead, so the documented test
# command never reports success without having run the Redis tests.
REQUIRE_REDIS = os.environ.get("REMI_REQUIRE_REDIS") == "1"


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh, empty redis-server for one test; `.url`, `.stop()`, `.start()`, `.client()`."""
    yield from _redis(tmp_path_factory)


@pytest.fixture
def redis_without_hello(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server without the HELLO command, as Redis 5 (redis-py 8 opens connections with
    HELLO 3 unless told to speak RESP2); its `.client()` therefore does not work."""
    yield from _redis(tmp_path_factory, "--rename-command", "HELLO", "")


def _redis(factory: pytest.TempPathFactory, *extra: str) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(factory.mktemp("redis"))
    server.start(10.0, *extra)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _keep_priority() -> Iterator[None]:
    """Put this process's nice value back after each test: `nightly` and `bootstrap` run in
    process (CliRunner) lower every thread's (remi_core.threads.lower_priority), which would
    leave each later test, and the servers it starts, at nice 19."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    yield
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # an ended thread, or no right to raise priority
            if os.getpriority(os.PRIO_PROCESS, int(task.name)) != before:
                os.setpriority(os.PRIO_PROCESS, int(task.name), before)


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
