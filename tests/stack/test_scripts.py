"""The project's own scripts, as a new user's shell runs them (whatever it has set)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


def test_ensure_redis_takes_the_tests_own_redis_server(tmp_path: Path) -> None:
    # REMI_TEST_REDIS_SERVER is what the tests start; with it, no redis-server on the PATH is
    # needed (it stopped, or apt-get installed a package nobody would use).
    server = shutil.which("redis-server") or sys.executable
    path = tmp_path / "bin"
    path.mkdir()
    for tool in ("sh", "id"):
        (path / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(path), "REMI_TEST_REDIS_SERVER": server}
    done = subprocess.run(["sh", "scripts/ensure-redis.sh"], cwd=REPO, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.integration
def test_the_suite_ignores_the_shells_settings_and_proxy() -> None:
    # In-process Settings() read every REMI_* the shell had (REMI_MAX_N=5 failed 11 tests), a
    # bad REMI_THREADS stayed, and httpx sent local requests to HTTP_PROXY.
    env = {
        **os.environ,
        "REMI_MAX_N": "5",
        "REMI_EXACT_SEARCH": "float32",
        "REMI_THREADS": "abc",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
    }
    tests = ["tests/service/test_service_recommend.py", "tests/service/test_service_cli.py"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests,
         "-k", "response_shape or n_larger or answers_over_http"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


@pytest.mark.integration
def test_the_quickstart_refuses_a_taken_port_before_training() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            ["bash", "scripts/quickstart.sh"],
            cwd=REPO,
            env={**os.environ, "PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 1
    assert f"error: port {port} is taken on 127.0.0.1" in done.stderr
    assert "training" not in done.stdout
