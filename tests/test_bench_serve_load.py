"""The serving load benchmark runs end to end on tiny settings (its figures are not checked)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("REMI_DATA_ROOT", ROOT.parent / "shared" / "data"))
pytestmark = pytest.mark.integration


def bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "bench/bench_serve_load.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_a_missing_data_root_is_named() -> None:
    run = bench("--data-root", "/nonexistent")
    assert run.returncode != 0
    assert "--data-root" in run.stderr and "Sports_and_Outdoors" in run.stderr


@pytest.mark.skipif(not (DATA / "amazon_sports").is_dir(), reason="needs REMI_DATA_ROOT")
def test_the_benchmark_runs_and_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nkept\n")
    args = [
        "--data-root", str(DATA), "--work-dir", str(tmp_path / "work"), "--train-iters", "30",
        "--sizes", "20000,40000,50000", "--exact-max-items", "30000", "--quick", "--duration", "1",
        "--out", str(out),
    ]  # fmt: skip
    run = bench(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n")
    section = text.split("<!-- bench_serve_load:start -->")[1].split("<!-- bench_serve_load:end")[0]
    assert "| 20k | Flat |" in section and "| 40k | IVF512,SQ8 |" in section
    exact_row = next(line for line in section.splitlines() if line.startswith("| 20k | Flat |"))
    assert re.search(
        r"batches of \d+, \d+ compute threads: \d+ \(\d\.\d\d x the bound\) \|$", exact_row
    )
    assert "| 40k | defaults | 16 |" in section
    assert "| 50k | IVF512,SQ8 |" in section and "| 50k | defaults | 16 |" in section
    # Rerunning replaces the section instead of appending another.
    run = bench(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.read_text().count("bench_serve_load:start") == 1
