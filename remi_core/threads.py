"""Thread set-up shared by every entry point (remi-train, remi-serve, bench/, the images).

Two things make CPU training collapse when other processes share the cores (issue 16: 18x
slower with one busy process beside it):

- OpenMP's default wait policy spins at every barrier. When one of its threads has no core, the
  others burn their time slices waiting for it. A passive policy sleeps instead.
- Pools sized to the host's core count (`os.cpu_count()`) ignore the CPU affinity and the
  container's CPU quota, so a job limited to one CPU still starts one thread per host core.

torch and faiss each bundle their own OpenMP runtime, and each reads OMP_WAIT_POLICY and
OMP_NUM_THREADS once, when it is loaded. `prepare_environment()` therefore only sets environment
variables and imports nothing heavy; the `training` and `service` packages call it from their
`__init__`, so it runs before any of their modules imports torch or faiss, whichever way the
program was started (console script, `python -m`, `uvicorn service.app:create_app`).
`setup_threads()` then applies a count to both runtimes (for the `--threads` flags, which are
parsed after torch is loaded) and returns what was set up.

One setting overrides the count: REMI_THREADS (or `--threads` on remi-train and remi-serve). An
explicit OMP_WAIT_POLICY in the environment is respected.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

THREADS_ENV = "REMI_THREADS"
"""The one documented override of the thread count (a positive integer)."""
DEBUG_ENV = "REMI_DEBUG_THREADS"
"""When set to 1, `setup_threads` prints the set-up it applied as one JSON line on stderr."""
# Set together with OMP_NUM_THREADS so BLAS libraries with their own pools (MKL, OpenBLAS
# pthreads builds) follow the same count.
_COUNT_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


_OPENMP_MODULES = ("torch", "faiss")
_prepared_in_time = False  # prepare_environment ran before torch and faiss were imported


class ThreadSettingError(ValueError):
    """REMI_THREADS or --threads is not a positive integer."""


@dataclass(frozen=True)
class ThreadSetup:
    """What a process was set up with (also what REMI_DEBUG_THREADS=1 prints)."""

    threads: int
    """Threads of torch's and faiss's OpenMP pools."""
    source: str
    """Where the count came from: 'flag', 'REMI_THREADS' or 'cpus available'."""
    cpus_available: int
    """CPUs this process may use: its affinity, capped by the cgroup CPU quota."""
    wait_policy: str
    """OMP_WAIT_POLICY as the OpenMP runtimes read it."""
    prepared_in_time: bool
    """The environment was set before torch and faiss were imported (so their runtimes read
    it); False means the entry point imported them first and the wait policy is the default."""
    torch_threads: int | None
    """torch.get_num_threads() after the set-up (None if torch is not loaded)."""
    faiss_threads: int | None
    """faiss.omp_get_max_threads() after the set-up (None if faiss is not loaded)."""


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_paths(proc_cgroup: str) -> tuple[str | None, dict[str, str]]:
    """(cgroup v2 path, {v1 controller: path}) from the text of /proc/self/cgroup."""
    v2, v1 = None, {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        for controller in controllers.split(","):
            if controller:
                v1[controller] = path
    return v2, v1


def _ancestors(mount: Path, path: str) -> list[Path]:
    """The cgroup directory of `path` under `mount` and every parent up to the mount: a
    parent's limit binds its children too. Inside a container the path is often "/"."""
    parts = [p for p in path.split("/") if p]
    dirs = [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def cgroup_cpu_limit(root: Path = Path("/"), proc_cgroup: str | None = None) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when unlimited.

    cgroup v2: `cpu.max` ("<quota> <period>" or "max <period>"); v1: `cpu.cfs_quota_us` over
    `cpu.cfs_period_us` (-1 = unlimited). The smallest limit along the path wins. `root` and
    `proc_cgroup` exist for tests.
    """
    if proc_cgroup is None:
        proc_cgroup = _read(root / "proc/self/cgroup") or ""
    v2_path, v1_paths = _cgroup_paths(proc_cgroup)
    limits: list[float] = []
    sys_cgroup = root / "sys/fs/cgroup"
    if v2_path is not None and (sys_cgroup / "cgroup.controllers").exists():
        for directory in _ancestors(sys_cgroup, v2_path):
            fields = (_read(directory / "cpu.max") or "").split()
            if len(fields) == 2 and fields[0] != "max":
                limits.append(int(fields[0]) / int(fields[1]))
    for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        mount = sys_cgroup / controller
        if "cpu" not in v1_paths or not mount.is_dir():
            continue
        for directory in _ancestors(mount, v1_paths["cpu"]):
            quota = _read(directory / "cpu.cfs_quota_us")
            period = _read(directory / "cpu.cfs_period_us")
            if quota and period and int(quota) > 0 and int(period) > 0:
                limits.append(int(quota) / int(period))
        break
    return min(limits) if limits else None


def available_cpus() -> int:
    """CPUs this process may use: its CPU affinity, capped by the cgroup quota (rounded down,
    at least 1: a thread per partial CPU would be throttled by the quota at every period)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return max(1, cpus)


def _parse(value: str, what: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ThreadSettingError(f"{what} must be a positive integer, not {value!r}")
    return count


def resolve_threads(flag: int | None = None) -> tuple[int, str]:
    """(thread count, where it came from): the flag, else REMI_THREADS, else the CPUs
    available."""
    if flag is not None:
        return _parse(str(flag), "--threads"), "flag"
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        return _parse(value, THREADS_ENV), THREADS_ENV
    return available_cpus(), "cpus available"


def prepare_environment() -> None:
    """Set the OpenMP environment before torch or faiss load their runtimes (imports nothing).

    A bad REMI_THREADS is left for `setup_threads` to report (with the flag's name) rather than
    failing an import.
    """
    global _prepared_in_time
    if not any(name in sys.modules for name in _OPENMP_MODULES):
        _prepared_in_time = True
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        threads, _ = resolve_threads()
    except ThreadSettingError:
        return
    for name in _COUNT_VARIABLES:
        os.environ[name] = str(threads)


def setup_threads(
    flag: int | None = None, torch_threads: int | None = None, faiss_threads: int | None = None
) -> ThreadSetup:
    """Size torch's and faiss's pools (the flag, else REMI_THREADS, else the CPUs available).

    `torch_threads` and `faiss_threads` set a pool apart from that count (the service sizes both
    from REMI_TORCH_THREADS); None uses the count. Raises ThreadSettingError for a bad count.
    Prints the result on stderr when REMI_DEBUG_THREADS=1.
    """
    threads, source = resolve_threads(flag)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for name in _COUNT_VARIABLES:  # child processes (uvicorn workers) inherit the count
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(torch_threads or threads)
    faiss_applied = None
    if "faiss" in sys.modules:
        faiss = sys.modules["faiss"]
        faiss.omp_set_num_threads(faiss_threads or threads)
        faiss_applied = faiss.omp_get_max_threads()
    setup = ThreadSetup(
        threads=threads,
        source=source,
        cpus_available=available_cpus(),
        wait_policy=os.environ["OMP_WAIT_POLICY"],
        prepared_in_time=_prepared_in_time,
        torch_threads=torch.get_num_threads(),
        faiss_threads=faiss_applied,
    )
    if os.environ.get(DEBUG_ENV) == "1":
        print("remi-threads " + json.dumps(asdict(setup)), file=sys.stderr, flush=True)
    return setup


def describe(setup: ThreadSetup) -> str:
    """One line for logs and benchmark headers."""
    return (
        f"threads {setup.threads} ({setup.source}; {setup.cpus_available} CPUs available), "
        f"OMP_WAIT_POLICY={setup.wait_policy}, torch {setup.torch_threads} threads"
    )


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat's first line."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def busy_cpus(seconds: float = 1.0) -> float | None:
    """How many CPUs were busy (host-wide, any process) over the next `seconds`; None where
    /proc/stat cannot be read. Benchmarks call it before they start to warn about shared cores."""
    import time

    try:
        busy0, total0 = _cpu_jiffies()
        time.sleep(seconds)
        busy1, total1 = _cpu_jiffies()
    except (OSError, ValueError, IndexError):
        return None
    cpus = os.cpu_count() or 1
    return cpus * (busy1 - busy0) / max(1, total1 - total0)
