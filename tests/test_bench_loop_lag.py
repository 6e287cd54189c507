"""bench/bench_loop_lag.py runs end to end and reports every variant."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def test_loop_lag_benchmark_reports_each_variant() -> None:
    args = ["--items", "2000", "--seconds", "0.3", "--rounds", "1", "--intervals", "0.5,5"]
    out = subprocess.run(
        [sys.executable, "bench/bench_loop_lag.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    number = r"\s+(\d+\.\d\d)"
    rows = [row[0] for row in re.findall(r"^(\S.*?)" + number * 4 + r"\s*$", out, re.M)]
    names = [
        "served, interval 0.5 ms",
        "served, interval 5 ms",
        "search, ids as served, 0.5 ms",
        "search, numpy gather per user, 0.5 ms",
    ]
    assert sorted(rows) == sorted(names), out
