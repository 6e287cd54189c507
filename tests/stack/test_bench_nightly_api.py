"""bench/bench_nightly_api.py runs end to end on tiny settings (its figures are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REDIS_SERVER

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"),
]


def test_api_latency_benchmark_beside_a_nightly_run() -> None:
    done = subprocess.run(
        [sys.executable, "bench/bench_nightly_api.py", "--config", "configs/nightly-test.yaml",
         "--seconds", "2", "--rate", "10", "--phases", "idle,budget"],
        cwd=REPO,
        env={"REMI_TEST_REDIS_SERVER": REDIS_SERVER, **os.environ},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = done.stdout.split("API latency under 10 requests/s")[1].splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["idle", "budget"]
    assert [int(row.split()[2]) for row in rows] == [0, 0]  # no failed requests
    assert "p99" in rows[1] and "x idle" in rows[1]
