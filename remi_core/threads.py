"""Thread set-up shared by every entry point (remi-train, remi-serve, bench/, the images).

Two things make CPU training collapse when other processes share the cores (issue 16: 18x
slower with one busy process beside it):

- OpenMP threads spin at every barrier. When one of them has no core, the others burn their
  time slices waiting for it.
- Pools sized to the host's core count (`os.cpu_count()`) ignore the CPU affinity and the
  container's CPU quota, so a job limited to one CPU still starts one thread per host core.

Sleeping at every barrier instead (OMP_WAIT_POLICY=PASSIVE) removes the collapse but costs idle
training about 1.4x: a training step runs thousands of small parallel regions, and each one then
pays a futex wake-up. So the two kinds of process wait differently:

- Training ("spin" wait): OpenMP's own default (spin a while at a barrier, then sleep) keeps
  idle training fast, and `LoadFollower` keeps the spinning threads from sharing a core: it
  samples how much CPU other processes use and shrinks torch's pool to the CPUs they leave free
  (1 thread on a 2-core machine as soon as one busy process competes), then grows it back when
  they go. A shorter spin (GOMP_SPINCOUNT=10000) measured 2% slower idle and is not needed once
  the pool never outnumbers the free cores.
- Serving ("passive" wait): requests arrive in bursts and the event loop needs its core between
  them, so pool threads sleep as soon as they are idle.

torch and faiss each bundle their own OpenMP runtime, and each reads these variables once, when
it is loaded. `prepare_environment()` therefore only sets environment variables and imports
nothing heavy; the `training` and `service` packages call it from their `__init__`, so it runs
before any of their modules imports torch or faiss, whichever way the program was started
(console script, `python -m`, `uvicorn service.app:create_app`). `setup_threads()` then applies
a count to both runtimes (for the `--threads` flags, which are parsed after torch is loaded) and
returns what was set up.

One setting fixes the count: REMI_THREADS (or `--threads` on remi-train and remi-serve); a fixed
count also turns the load follower off, so reruns on the same machine are bit-identical whatever
else runs (torch's reductions depend on the thread count). An explicit OMP_WAIT_POLICY or
GOMP_SPINCOUNT in the environment is respected.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

THREADS_ENV = "REMI_THREADS"
"""The one documented override of the thread count (a positive integer)."""
DEBUG_ENV = "REMI_DEBUG_THREADS"
"""When set to 1, `setup_threads` prints the set-up it applied as one JSON line on stderr."""
MAX_THREADS = 1024
"""The most threads a pool may be given: far past any host's cores, and short of the counts at
which torch overflows or OpenMP cannot allocate its pool (a crash, not an error)."""
# Set together with OMP_NUM_THREADS so BLAS libraries with their own pools (MKL, OpenBLAS
# pthreads builds) follow the same count.
_COUNT_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


WaitPolicy = Literal["spin", "passive"]

_OPENMP_MODULES = ("torch", "faiss")
_prepared_in_time = False  # prepare_environment ran before torch and faiss were imported
_setup: ThreadSetup | None = None  # the last set-up applied in this process
_follower: LoadFollower | None = None  # created by the first follow_load()


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
    """How idle pool threads wait, as the OpenMP runtimes read it: "PASSIVE" (sleep at once),
    OpenMP's default (spin a while, then sleep), or what OMP_WAIT_POLICY/GOMP_SPINCOUNT say."""
    follows_load: bool
    """The thread count follows the CPUs other processes leave free (`LoadFollower`); False
    when the count was fixed by the flag or REMI_THREADS, or for passive waiting."""
    prepared_in_time: bool
    """The environment was set before torch and faiss were imported (so their runtimes read
    it); False means the entry point imported them first and the wait policy is the default."""
    torch_threads: int | None
    """torch.get_num_threads() after the set-up (None if torch is not loaded)."""
    faiss_threads: int | None
    """faiss.omp_get_max_threads() after the set-up (None if faiss is not loaded)."""


def debug_line(tag: str, payload: dict) -> None:
    """Print `tag {json}` on stderr when REMI_DEBUG_THREADS=1, in one write: uvicorn's workers
    share the descriptor, and print()'s separate newline write let two workers' lines run into
    one."""
    if os.environ.get(DEBUG_ENV) == "1":
        sys.stderr.write(f"{tag} {json.dumps(payload)}\n")
        sys.stderr.flush()


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
    if count > MAX_THREADS:
        raise ThreadSettingError(f"{what} must be at most {MAX_THREADS}, not {value!r}")
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


def _wait_policy() -> str:
    if "OMP_WAIT_POLICY" in os.environ:
        return os.environ["OMP_WAIT_POLICY"]
    spin = os.environ.get("GOMP_SPINCOUNT")
    return f"GOMP_SPINCOUNT={spin}" if spin else "spin, then sleep (OpenMP default)"


def prepare_environment(wait: WaitPolicy) -> None:
    """Set the OpenMP environment before torch or faiss load their runtimes (imports nothing).

    `wait`: "spin" for training (OpenMP's default; pair it with `follow_load`), "passive" for
    serving.
    A bad REMI_THREADS is left for `setup_threads` to report (with the flag's name) rather than
    failing an import.
    """
    global _prepared_in_time
    if not any(name in sys.modules for name in _OPENMP_MODULES):
        _prepared_in_time = True
    if wait == "passive" and "GOMP_SPINCOUNT" not in os.environ:  # else: the user's choice
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
    global _setup, _follower
    threads, source = resolve_threads(flag)
    for name in _COUNT_VARIABLES:  # child processes (uvicorn workers) inherit the count
        os.environ[name] = str(threads)
    faiss_applied = _set_pools(torch_threads or threads, faiss_threads or threads)
    import torch

    setup = ThreadSetup(
        threads=threads,
        source=source,
        cpus_available=available_cpus(),
        wait_policy=_wait_policy(),
        follows_load=_may_follow(source),
        prepared_in_time=_prepared_in_time,
        torch_threads=torch.get_num_threads(),
        faiss_threads=faiss_applied,
    )
    _setup, _follower = setup, None
    debug_line("remi-threads", asdict(setup))
    return setup


def _set_pools(torch_threads: int, faiss_threads: int) -> int | None:
    """Apply the counts to torch's pool and, if faiss is loaded, to faiss's; returns faiss's
    count as it reads it back (None without faiss)."""
    import torch

    torch.set_num_threads(torch_threads)
    if "faiss" not in sys.modules:
        return None
    faiss = sys.modules["faiss"]
    faiss.omp_set_num_threads(faiss_threads)
    return faiss.omp_get_max_threads()


def _may_follow(source: str) -> bool:
    """A count from the CPUs available (not fixed by the flag or REMI_THREADS), with OpenMP
    spinning rather than passive: see ThreadSetup.follows_load."""
    return source == "cpus available" and os.environ.get("OMP_WAIT_POLICY") != "PASSIVE"


def _follows_load() -> bool:
    """Whether this process's count may follow the load: as set up, or as it would be."""
    if _setup is not None:
        return _setup.follows_load
    try:
        return _may_follow(resolve_threads()[1])
    except ThreadSettingError:  # a bad REMI_THREADS: setup_threads will say so
        return False


class LoadFollower:
    """Sizes the calling thread's OpenMP pools to the CPUs other processes leave free.

    Every `interval` seconds `tick()` compares the busy time of the CPUs in this process's
    affinity (/proc/stat) with this process's own CPU time (/proc/self/stat): the difference is
    what other processes used. The pool shrinks at once when they take its cores (a spinning pool
    that shares a core collapses) and grows back after two samples in a row say the cores are
    free again. OpenMP keeps the thread count per calling thread, so `tick()` must run on the
    thread that does the computation.
    """

    def __init__(
        self,
        max_threads: int,
        interval: float = 0.5,
        cpus: Iterable[int] | None = None,
        proc: Path = Path("/proc"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`cpus`: the CPUs to watch (default: this process's affinity); `proc` and `clock`
        exist for tests."""
        self.max_threads = max_threads
        self.threads = max_threads
        self.interval = interval
        self.changes = 0
        """How often the pool was resized (for logs and benchmarks)."""
        if cpus is None:
            try:
                cpus = os.sched_getaffinity(0)
            except AttributeError:  # not Linux: no /proc/stat either, so no samples
                cpus = ()
        self._cpus = {f"cpu{i}" for i in cpus}
        self._proc, self._clock = proc, clock
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._grow_votes = 0
        self._last = self._sample()

    def _sample(self) -> tuple[float, int, int] | None:
        """(monotonic seconds, busy jiffies of our CPUs, this process's jiffies)."""
        try:
            busy = 0
            for line in (self._proc / "stat").read_text().splitlines():
                name, _, rest = line.partition(" ")
                if name in self._cpus:
                    f = [int(x) for x in rest.split()]
                    busy += sum(f[:8]) - f[3] - f[4]  # all but idle and iowait (steal counts)
            # /proc/self/stat: the command may contain spaces, so count from its closing ")".
            fields = (self._proc / "self/stat").read_text().rpartition(")")[2].split()
            own = int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, ValueError, IndexError):
            return None
        return self._clock(), busy, own

    def others(self, before: tuple[float, int, int], after: tuple[float, int, int]) -> float:
        """CPUs other processes kept busy between two samples."""
        seconds = max(after[0] - before[0], 1e-9)
        foreign = (after[1] - before[1]) - (after[2] - before[2])
        return max(0.0, foreign / self._hz / seconds)

    def wanted(self, others: float) -> int:
        """Threads for the CPUs left free: a core counts as free while others use under half
        of it (2 CPUs: 2 threads while others use up to 0.5 CPU, 1 thread above)."""
        spare = len(self._cpus) - others
        return max(1, min(self.max_threads, math.floor(spare + 0.5)))

    def tick(self) -> int:
        """Resize the pools if the load changed; returns the thread count now in use."""
        if self._last is None or self._clock() - self._last[0] < self.interval:
            return self.threads
        sample = self._sample()
        if sample is None:
            self._last = None  # unreadable /proc: keep the count we have
            return self.threads
        want = self.wanted(self.others(self._last, sample))
        self._last = sample
        self._grow_votes = self._grow_votes + 1 if want > self.threads else 0
        if want < self.threads or (want > self.threads and self._grow_votes >= 2):
            self._resize(want)
        return self.threads

    def _resize(self, threads: int) -> None:
        _set_pools(threads, threads)
        debug_line("remi-threads-resize", {"from": self.threads, "to": threads})
        self.threads, self._grow_votes = threads, 0
        self.changes += 1


def follow_load() -> int | None:
    """Call from the compute loop (training steps, evaluation batches): resizes the pools to the
    load when this process's count may follow it (see `LoadFollower`); about 0.1 us between
    samples. Returns the thread count in use, None when the count is fixed."""
    global _follower
    if _follower is None:
        if not _follows_load():
            return None
        import torch

        _follower = LoadFollower(torch.get_num_threads())
    return _follower.tick()


def lower_priority(increment: int) -> int:
    """Add `increment` to the nice value of every thread of this process (at most 19) and return
    the process's nice value.

    For batch jobs that share a host with a service: under contention the scheduler then hands
    the service's threads the CPU first, and on idle cores nothing changes. Linux keeps a nice
    value per thread, so each existing thread (OpenMP pools already started) is lowered; threads
    started later inherit it from the thread that starts them.
    """
    if increment > 0:
        try:
            tids = [int(t.name) for t in Path("/proc/self/task").iterdir()]
        except OSError:  # not Linux: one value for the process
            tids = [0]
        for tid in tids:
            try:
                now = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, min(19, now + increment))
            except OSError:  # the thread ended meanwhile
                continue
    return os.getpriority(os.PRIO_PROCESS, 0)


def load_follower() -> LoadFollower | None:
    """The follower `follow_load()` uses in this process (None before its first call or when
    the count is fixed): for logs and benchmarks."""
    return _follower


def describe(setup: ThreadSetup) -> str:
    """One line for logs and benchmark headers."""
    return (
        f"threads {setup.threads} ({setup.source}; {setup.cpus_available} CPUs available), "
        f"wait {setup.wait_policy}, torch {setup.torch_threads} threads"
        + (", following the load" if setup.follows_load else "")
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
