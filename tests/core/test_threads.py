"""The thread set-up (remi_core.threads) and that every entry point applies it.

Each entry point runs in a subprocess with REMI_DEBUG_THREADS=1 and reports back the wait policy,
whether it was set before torch/faiss loaded, and torch's and faiss's thread counts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remi_core.threads import (
    LoadFollower,
    ThreadSettingError,
    available_cpus,
    cgroup_cpu_limit,
    resolve_threads,
)
from tests.helpers import child_env, dead_redis_url, free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
CPUS = len(os.sched_getaffinity(0))
ONE_CPU = min(os.sched_getaffinity(0))


# --- cgroup quota parsing, on cgroup trees laid out like the kernel's -----------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_in_cpus(tmp_path: Path) -> None:
    write(tmp_path / "sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
    write(tmp_path / "sys/fs/cgroup/cpu.max", "150000 100000\n")  # a container: cgroup "/"
    assert cgroup_cpu_limit(tmp_path, "0::/\n") == 1.5
    write(tmp_path / "sys/fs/cgroup/cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/\n") is None


def test_cgroup_v2_the_tightest_ancestor_wins(tmp_path: Path) -> None:
    cg = tmp_path / "sys/fs/cgroup"
    write(cg / "cgroup.controllers", "cpu\n")
    write(cg / "system.slice/cpu.max", "100000 100000\n")
    write(cg / "system.slice/job.scope/cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/system.slice/job.scope\n") == 1.0


def test_cgroup_v1_cfs_quota(tmp_path: Path) -> None:
    cpu = tmp_path / "sys/fs/cgroup/cpu,cpuacct"
    write(cpu / "docker/abc/cpu.cfs_quota_us", "250000\n")
    write(cpu / "docker/abc/cpu.cfs_period_us", "100000\n")
    write(cpu / "cpu.cfs_quota_us", "-1\n")
    write(cpu / "cpu.cfs_period_us", "100000\n")
    proc = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n"
    assert cgroup_cpu_limit(tmp_path, proc) == 2.5
    write(cpu / "docker/abc/cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_limit(tmp_path, proc) is None


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path, "") is None


def test_the_count_comes_from_the_flag_then_remi_threads_then_the_cpus(monkeypatch) -> None:
    monkeypatch.delenv("REMI_THREADS", raising=False)
    assert resolve_threads() == (available_cpus(), "cpus available")
    assert available_cpus() <= CPUS
    monkeypatch.setenv("REMI_THREADS", "3")
    assert resolve_threads() == (3, "REMI_THREADS")
    assert resolve_threads(5) == (5, "flag")
    monkeypatch.setenv("REMI_THREADS", "many")
    with pytest.raises(ThreadSettingError, match="REMI_THREADS must be a positive integer"):
        resolve_threads()
    with pytest.raises(ThreadSettingError, match="--threads must be a positive integer"):
        resolve_threads(0)
    # torch overflowed (a traceback) or OpenMP failed to allocate the pool (a dead process).
    monkeypatch.setenv("REMI_THREADS", "2147483647")
    with pytest.raises(ThreadSettingError, match="REMI_THREADS must be at most 1024"):
        resolve_threads()


# --- the load follower, on /proc files laid out like the kernel's ---------------------------------


class FakeProc:
    """/proc/stat and /proc/self/stat for two watched CPUs (0, 1) and one ignored (2), at 100
    jiffies a second, and a clock the test moves."""

    def __init__(self, root: Path) -> None:
        self.root, self.now = root, 0.0
        self.busy = [0, 0, 0]  # jiffies per CPU
        self.own = 0
        self.write()

    def write(self) -> None:
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
        for i, busy in enumerate(self.busy):  # user nice system idle iowait irq softirq steal
            lines.append(f"cpu{i} {busy} 0 0 {10**6} 7 0 0 0 0 0")
        write(self.root / "stat", "\n".join(lines) + "\nintr 1 2 3\n")
        own = f"4242 (python -m x) R 1 1 1 0 -1 4194560 1 0 0 0 {self.own} 0 0 0 20 0 3 0"
        write(self.root / "self/stat", own + "\n")

    def advance(self, seconds: float, others: float, own: float) -> None:
        """`others` and `own`: CPUs kept busy over the interval (others on CPUs 0-1 plus a full
        CPU 2 that nobody watches)."""
        self.now += seconds
        self.busy[0] += round(100 * seconds * (others + own))
        self.busy[2] += round(100 * seconds)
        self.own += round(100 * seconds * own)
        self.write()


def follower(proc: FakeProc, max_threads: int = 2) -> LoadFollower:
    return LoadFollower(max_threads, 0.5, cpus=[0, 1], proc=proc.root, clock=lambda: proc.now)


def test_the_load_follower_counts_only_other_processes_on_its_cpus(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    f = follower(proc)
    before = f._sample()
    proc.advance(1.0, others=0.4, own=1.3)
    assert f.others(before, f._sample()) == pytest.approx(0.4)
    assert f.tick() == 2  # 0.4 CPU taken: both cores still count as free
    # Between samples nothing is read (a tick costs a clock call).
    proc.advance(0.2, others=2.0, own=0.0)
    assert f.tick() == 2 and f.changes == 0


def test_the_load_follower_shrinks_at_once_and_grows_after_two_free_samples(
    tmp_path: Path,
) -> None:
    pytest.importorskip("torch")
    import torch

    start = torch.get_num_threads()
    proc = FakeProc(tmp_path)
    f = follower(proc)
    try:
        proc.advance(0.5, others=0.3, own=1.7)  # background noise: keep both threads
        assert f.tick() == 2
        proc.advance(0.5, others=0.67, own=1.33)  # one busy process beside two spinning threads
        assert f.tick() == 1 and torch.get_num_threads() == 1 and f.changes == 1
        proc.advance(0.5, others=1.0, own=1.0)
        assert f.tick() == 1
        proc.advance(0.5, others=0.0, own=1.0)  # it went: one free sample is not enough
        assert f.tick() == 1
        proc.advance(0.5, others=0.0, own=1.0)
        assert f.tick() == 2 and torch.get_num_threads() == 2 and f.changes == 2
        capped = follower(FakeProc(tmp_path / "capped"), max_threads=1)  # e.g. a CPU quota of 1
        assert capped.wanted(0.0) == 1
    finally:
        torch.set_num_threads(start)


def test_the_load_follower_keeps_its_count_when_proc_cannot_be_read(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    f = follower(proc)
    (tmp_path / "stat").write_text("garbage\n")
    (tmp_path / "self/stat").unlink()
    proc.now += 5
    assert f.tick() == 2 and f.changes == 0


# --- every entry point, in a subprocess -----------------------------------------------------------


def console_script(name: str, module: str) -> list[str]:
    """The installed console script, else the module it runs (the same code path)."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


def clean_env(**extra: str) -> dict[str, str]:
    # No inherited OMP_*/MKL_* settings either: this test process has its own.
    inherited = child_env().items()
    env = {k: v for k, v in inherited if not k.startswith(("OMP_", "MKL_", "OPENBLAS_"))}
    return {**env, "REMI_DEBUG_THREADS": "1", **extra}


def pin_to_one_cpu() -> None:
    os.sched_setaffinity(0, {ONE_CPU})  # what `taskset -c N` or a cpuset does


def reports(output: str) -> list[dict]:
    return [
        json.loads(line.split("remi-threads ", 1)[1])
        for line in output.splitlines()
        if line.startswith("remi-threads ")
    ]


def run_train(args: list[str], one_cpu: bool = False, **env: str) -> dict:
    done = subprocess.run(
        console_script("remi-train", "training.cli") + args,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=pin_to_one_cpu if one_cpu else None,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    [report] = reports(done.stderr)
    return report


SPIN = "spin, then sleep (OpenMP default)"


def assert_set_up(report: dict, threads: int, follows_load: bool = True) -> None:
    # Training keeps OpenMP's spinning wait; the load follower keeps it off shared cores.
    assert report["wait_policy"] == SPIN
    assert report["follows_load"] == follows_load
    assert report["prepared_in_time"], "torch or faiss was imported before the thread set-up"
    assert report["threads"] == threads
    assert report["torch_threads"] == threads


@pytest.mark.integration
def test_remi_train_sizes_threads_to_the_cpus_it_may_use(tmp_path: Path) -> None:
    args = ["versions", "--bundle-root", str(tmp_path)]
    assert_set_up(run_train(args), CPUS)
    pinned = run_train(args, one_cpu=True)
    assert_set_up(pinned, 1)
    assert pinned["cpus_available"] == 1


@pytest.mark.integration
def test_remi_train_threads_flag_and_environment_override(tmp_path: Path) -> None:
    # A fixed count also stops the follower: reruns stay bit-identical whatever else runs.
    args = ["versions", "--bundle-root", str(tmp_path)]
    assert_set_up(run_train(["--threads", "3", *args]), 3, follows_load=False)
    assert_set_up(run_train(args, REMI_THREADS="3"), 3, follows_load=False)
    bad = subprocess.run(
        console_script("remi-train", "training.cli") + args,
        env=clean_env(REMI_THREADS="lots"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "REMI_THREADS must be a positive integer, not 'lots'" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.integration
def test_remi_train_train_command_applies_it(tmp_path: Path) -> None:
    # A real (tiny) training command, pinned to one CPU.
    args = ["train", "--data", "synthetic", "--synthetic-users", "200", "--max-iters", "2"]
    args += ["--eval-every", "2", "--dim", "8", "--run-dir", str(tmp_path / "run")]
    assert_set_up(run_train(args, one_cpu=True), 1)


@pytest.mark.integration
@pytest.mark.skipif(CPUS < 2, reason="one CPU: a single thread has nothing to shrink to")
def test_training_shrinks_its_pool_when_other_processes_take_the_cores(tmp_path: Path) -> None:
    # Real training beside one busy process per CPU: within a sample or two (0.5 s each) the
    # pool drops below the CPU count, so spinning threads never wait for a thread with no core.
    args = ["train", "--data", "synthetic", "--synthetic-users", "300", "--max-iters", "100000"]
    args += ["--eval-every", "100000", "--dim", "16", "--no-progress"]
    args += ["--run-dir", str(tmp_path / "run")]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(CPUS)]
    log_path = tmp_path / "train.log"
    try:
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                console_script("remi-train", "training.cli") + args,
                env=clean_env(),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 90
        while "remi-threads-resize" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no resize within 90 s"
            time.sleep(0.2)
    finally:
        for p in [*busy, locals().get("proc")]:
            if p is not None:
                p.kill()
                p.wait()
    [report] = reports(log_path.read_text())
    assert report["follows_load"] and report["threads"] == CPUS
    resize = next(
        json.loads(line.split(" ", 1)[1])
        for line in log_path.read_text().splitlines()
        if line.startswith("remi-threads-resize ")
    )
    assert resize["from"] == CPUS and resize["to"] < CPUS


def serve_reports(
    tmp_path: Path, bundle_root: Path, workers: int, expected: int, one_cpu: bool, **env: str
) -> list[dict]:
    """Start remi-serve, collect one set-up report per worker, stop it."""
    log_path = tmp_path / f"serve-{workers}-{one_cpu}-{len(env)}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            console_script("remi-serve", "service.cli")
            + ["--port", str(free_port()), "--workers", str(workers)]
            + ["--bundle-root", str(bundle_root), "--no-check"],
            env=clean_env(REMI_REDIS_URL=dead_redis_url(), REMI_RELOAD_INTERVAL_S="0", **env),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=pin_to_one_cpu if one_cpu else None,
        )
        try:
            deadline = time.monotonic() + 90
            while len(reports(log_path.read_text())) < expected:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.2)
        finally:
            stop_process(proc, 30)
    return reports(log_path.read_text())


@pytest.mark.integration
def test_remi_serve_sets_up_each_worker(tmp_path: Path, tiny_bundle_root: Path) -> None:
    # One worker gets the CPUs; the pools set up in its main thread keep REMI_TORCH_THREADS'
    # default (1), or take them all with 0 (compute threads carry torch's count over; faiss's
    # is OpenMP's, per thread: see docs/serving.md).
    [report] = serve_reports(tmp_path, tiny_bundle_root, 1, 1, one_cpu=False)
    assert report["wait_policy"] == "PASSIVE" and report["prepared_in_time"]
    assert report["threads"] == CPUS
    assert report["torch_threads"] == report["faiss_threads"] == 1
    [wide] = serve_reports(tmp_path, tiny_bundle_root, 1, 1, False, REMI_TORCH_THREADS="0")
    assert wide["threads"] == wide["torch_threads"] == wide["faiss_threads"] == CPUS
    # Two workers share the CPUs out (at least one thread each).
    both = serve_reports(tmp_path, tiny_bundle_root, 2, 2, one_cpu=False)
    assert [r["threads"] for r in both] == [max(1, CPUS // 2)] * 2
    assert all(r["wait_policy"] == "PASSIVE" and r["prepared_in_time"] for r in both)
    [pinned] = serve_reports(tmp_path, tiny_bundle_root, 1, 1, one_cpu=True)
    assert pinned["threads"] == pinned["faiss_threads"] == 1


@pytest.mark.integration
def test_benchmark_scripts_set_up_threads() -> None:
    done = subprocess.run(
        [sys.executable, "bench/bench_service.py", "--items", "500", "--rounds", "2"]
        + ["--indexes", "Flat"],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=pin_to_one_cpu,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    [report] = reports(done.stderr)
    assert report["wait_policy"] == "PASSIVE" and report["prepared_in_time"]
    assert report["threads"] == report["faiss_threads"] == 1
    assert "threads: threads 1 (cpus available; 1 CPUs available)" in done.stdout


@pytest.mark.integration
def test_threads_benchmark_compares_the_set_ups_under_load() -> None:
    done = subprocess.run(
        [sys.executable, "bench/bench_threads.py", "--steps", "10", "--busy", "1", "--cap", "120"],
        cwd=REPO,
        env=clean_env(REMI_DEBUG_THREADS="0"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = [line.split() for line in done.stdout.splitlines() if line.strip().startswith("1 ")]
    assert row[0] == "1" and row.count("s") == 4  # a time for default, single, old, passive
    assert f"({CPUS} thr)" in done.stdout and "(1 thr)" in done.stdout
    assert "busy 1: default / single = " in done.stdout


def test_debug_lines_of_processes_sharing_stderr_stay_whole(tmp_path: Path) -> None:
    # uvicorn's workers share one stderr: each line must go out in one write, or two workers'
    # lines run into one (a newline written apart from its text did, in CI).
    script = (
        "from remi_core.threads import debug_line\n"
        "for i in range(3000): debug_line('remi-threads', {'worker': WORKER, 'i': i})\n"
    )
    log_path = tmp_path / "shared.log"
    with log_path.open("w") as log:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script.replace("WORKER", str(w))],
                env=clean_env(),
                stderr=log,
            )
            for w in range(2)
        ]
        for proc in procs:
            assert proc.wait(timeout=60) == 0
    lines = reports(log_path.read_text())
    assert sorted((r["worker"], r["i"]) for r in lines) == [
        (w, i) for w in range(2) for i in range(3000)
    ]
