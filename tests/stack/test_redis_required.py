"""The documented test command never passes without running the Redis tests (issue 12, 15).

scripts/test.sh runs scripts/ensure-redis.sh (install redis-server, or stop with a clear
message) and sets REMI_REQUIRE_REDIS=1, which turns a Redis test's skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENSURE = REPO / "scripts" / "ensure-redis.sh"
REDIS_TEST = "tests/service/test_service_redis.py::test_events_then_user_request"


def run_pytest(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "REMI_REQUIRE_REDIS"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        env={**base, "REMI_TEST_REDIS_SERVER": "/nonexistent/redis-server", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
def test_without_redis_a_plain_pytest_run_skips_the_redis_tests() -> None:
    done = run_pytest(REDIS_TEST)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "1 skipped" in done.stdout


@pytest.mark.integration
@pytest.mark.parametrize("target", [REDIS_TEST, "tests/stack/test_compose_native.py"])
def test_under_the_test_command_a_missing_redis_fails(target: str) -> None:
    # A fixture's skip and a module-level skipif marker alike.
    done = run_pytest(target, REMI_REQUIRE_REDIS="1")
    summary = done.stdout.splitlines()[-1]
    assert done.returncode == 1, done.stdout[-2000:]
    assert "skipped" not in summary and ("failed" in summary or "error" in summary)
    assert "but REMI_REQUIRE_REDIS=1 (scripts/test.sh): install redis-server" in done.stdout


def test_the_test_command_ensures_redis_first() -> None:
    lines = (REPO / "scripts" / "test.sh").read_text().splitlines()
    ensure = lines.index("sh scripts/ensure-redis.sh")
    require = lines.index("export REMI_REQUIRE_REDIS=1")
    run = next(i for i, line in enumerate(lines) if "pytest" in line)
    assert ensure < require < run


def run_ensure(bin_dir: Path, tools: list[str]) -> subprocess.CompletedProcess:
    """scripts/ensure-redis.sh as an unprivileged user whose PATH holds only `tools`."""
    for tool in tools:
        if (bin_dir / tool).exists():
            continue
        found = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True)
        (bin_dir / tool).symlink_to(found.stdout.strip())
    # The script on stdin, opened here: the unprivileged user may not read a checkout under a
    # root-only directory (/root), where CI may clone.
    argv = ["/bin/sh", "-s"]
    if os.geteuid() == 0:  # drop root, which would install
        drop = ["--reuid=65534", "--regid=65534", "--clear-groups"]
        argv = [shutil.which("setpriv") or "setpriv", *drop, *argv]
    with ENSURE.open() as script:
        return subprocess.run(
            argv, stdin=script, env={"PATH": str(bin_dir)}, capture_output=True, text=True,
            timeout=30,
        )  # fmt: skip


def test_ensure_redis_is_silent_when_redis_server_is_there(tmp_path: Path) -> None:
    from tests.helpers import REDIS_SERVER

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "redis-server").symlink_to(REDIS_SERVER)
    done = subprocess.run(
        ["/bin/sh", str(ENSURE)], env={"PATH": str(bin_dir)}, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stderr == ""


@pytest.fixture
def bin_dir() -> Iterator[Path]:
    """An empty directory the unprivileged user can read (pytest's tmp_path is root-only)."""
    with tempfile.TemporaryDirectory() as name:
        Path(name).chmod(0o755)
        yield Path(name)


def test_ensure_redis_stops_with_a_clear_message_when_it_cannot_install(bin_dir: Path) -> None:
    no_apt = run_ensure(bin_dir, ["id"])
    assert no_apt.returncode == 1
    assert "redis-server is not installed, and this is not a Debian/Ubuntu system" in (
        no_apt.stderr
    )
    assert "apt-get install -y" in no_apt.stderr
    apt = subprocess.run(["sh", "-c", "command -v apt-get"], capture_output=True, text=True)
    if apt.returncode == 0:  # a Debian/Ubuntu machine, but no root and no sudo
        no_root = run_ensure(bin_dir, ["id", "apt-get"])
        assert no_root.returncode == 1
        assert "installing it needs root or password-less sudo" in no_root.stderr
