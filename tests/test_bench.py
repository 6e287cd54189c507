"""The benchmarks run end to end on tiny settings (their figures are not checked here)."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.integration


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "bench/bench_train.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        # REMI_THREADS=1; OpenMP's own wait, whatever this test process was set up with.
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))},
            "REMI_THREADS": "1",
        },
    )


def test_training_benchmark_times_each_variant_to_the_target():
    run = bench("--variants", "eager,amp", "--steps", "5", "--target-hr50", "0.3")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    # The thread set-up comes first (REMI_THREADS=1 from bench(): a fixed count, OpenMP's wait).
    assert out.startswith("threads: threads 1 (REMI_THREADS;")
    assert "wait spin, then sleep (OpenMP default)" in out.splitlines()[0]
    assert "following the load" not in out.splitlines()[0]
    assert "python loop" in out and "on device" in out
    for variant in ("eager", "amp"):
        assert f"{variant}: HR@50 >= 0.3 after" in out
    summary = out.split("summary:")[1].splitlines()[1:]
    assert [line.split()[0] for line in summary] == ["eager", "amp"]


def test_an_unknown_variant_is_named_in_the_error():
    run = bench("--variants", "eager,turbo")
    assert run.returncode == 2
    assert "--variants: unknown turbo" in run.stderr


@pytest.mark.parametrize(
    ("script", "args", "says"),
    [
        ("bench_train.py", ["--steps", "0"], "argument --steps: a whole number >= 1, not '0'"),
        ("bench_train.py", ["--data", "/nonexistent.txt"], "--data: /nonexistent.txt: file not"),
        ("bench_diversity.py", ["--ns", "50,x"], "--ns: comma-separated whole numbers >= 1"),
        ("bench_serve_load.py", ["--sizes", "5"], "--sizes: 2 or 3 catalogue sizes, not 1"),
        ("bench_ivf_lists.py", ["--lists", "64,x"], "--lists: comma-separated whole numbers"),
        ("bench_ivf_lists.py", ["--items", "100", "--lists", "128"], "--lists: 128 lists for 100"),
        ("bench_service.py", ["--devices", "cpu,tpu"], "--devices: 'tpu' is not a device"),
        ("bench_service.py", ["--batches", "1,0"], "--batches: comma-separated whole numbers"),
        ("bench_serve_devices.py", ["--devices", "tpu"], "--devices: 'tpu' is not a device"),
        (
            "bench_serve_devices.py",
            ["--devices", "cpu", "--index", "IVF"],
            "--index/--search-params: invalid Faiss",
        ),
    ],
)
def test_bench_scripts_name_a_bad_flag(script: str, args: list[str], says: str) -> None:
    # A usage error before any work: --steps 0 was a ZeroDivisionError after the warm-up, and
    # --sizes was read only after the base model's minutes of training.
    run = subprocess.run(
        [sys.executable, f"bench/{script}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and says in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr


def test_the_device_benchmark_serves_over_http_on_each_device() -> None:
    # On a CPU host the CPU alone: a real remi-serve, wrk (or the Python load) at two levels.
    run = subprocess.run(
        [sys.executable, "bench/bench_serve_devices.py", "--items", "3000", "--devices", "cpu",
         "--seconds", "1", "--concurrency", "1,4"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert any(line.startswith("cpu: ") and line.endswith(" search on cpu") for line in lines)
    served = [line.split() for line in lines if line.strip().startswith("cpu ")]
    assert [row[1] for row in served] == ["c=1", "c=4"]
    assert all(float(row[2]) > 0 and row[-1] == "0" for row in served)  # req/s, no errors
    # An approximate bundle: faiss on a CPU host (the dense search on a GPU one).
    ivf = subprocess.run(
        [sys.executable, "bench/bench_serve_devices.py", "--items", "3000", "--devices", "cpu",
         "--seconds", "1", "--concurrency", "2", "--index", "IVF16,Flat",
         "--search-params", "nprobe=4"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ivf.returncode == 0, ivf.stderr[-2000:]
    assert "cpu: faiss search on cpu" in ivf.stdout.splitlines()
    # A server that cannot start: its log's end, which goes with the temporary directory.
    broken = subprocess.run(
        [sys.executable, "bench/bench_serve_devices.py", "--items", "300", "--devices", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "REMI_MAX_N": "abc"},
    )  # fmt: skip
    assert broken.returncode == 1, broken.stderr[-2000:]
    assert "remi-serve exited" in broken.stderr and "REMI_MAX_N: Input should be" in broken.stderr
