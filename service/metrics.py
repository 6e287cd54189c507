"""Prometheus metrics, on a registry per app so several apps can live in one process (tests).

Under `remi-serve --workers N` (N > 1) every worker writes its values to files in one directory
(prometheus_client's multiprocess mode, switched on by PROMETHEUS_MULTIPROC_DIR, which remi-serve
sets), and whichever worker answers GET /metrics reports all of them: counters and histograms
summed over workers, gauges as the largest value among the running workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import prometheus_client.values
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.mmap_dict import MmapedDict

from service.signals import InterestSignals

log = logging.getLogger(__name__)

# How often each of several workers rewrites its windowed gauges (see keep_gauges_current).
GAUGE_REFRESH_S = 1.0

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class BackedMmapedDict(MmapedDict):
    """prometheus_client's per-process metrics file, with disk blocks behind every page it maps.

    The library grows its files with truncate(), which leaves them sparse, and writes through
    mmap: on a full disk a write to a page the file system cannot back is a SIGBUS, which
    killed the worker (at start-up, or at a request with a new label set once the disk filled).
    Allocating the blocks first (posix_fallocate) turns that into an OSError there: the metric
    is not recorded, the request is answered (the callers catch it)."""

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            _allocate(filename, _INITIAL_SIZE)
        super().__init__(filename, read_mode)

    def _init_value(self, key: str) -> None:
        # The library's own growth rule: an entry of 4 + len(key) padded to 8 + 16 bytes, the
        # capacity doubled until it fits.
        encoded = len(key.encode("utf-8"))
        size = 4 + encoded + (8 - (encoded + 4) % 8) + 16
        capacity = self._capacity
        while self._used + size > capacity:
            capacity *= 2
        if capacity > self._capacity:
            _allocate(self._fname, capacity)
        super()._init_value(key)


def _allocate(filename: str, size: int) -> None:
    """Blocks for the first `size` bytes of the file (at least), created if missing. On a file
    descriptor of its own: the library's is in append mode, and where the file system has no
    fallocate glibc emulates it with writes, which it refuses on such a descriptor (EBADF)."""
    fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, max(os.fstat(fd).st_size, size))
    finally:
        os.close(fd)


_INITIAL_SIZE = 1 << 16  # a new file's capacity, as the library's own first size
prometheus_client.values.MmapedDict = BackedMmapedDict  # type: ignore[misc]


def shared_across_workers() -> bool:
    """Whether this process writes its metrics to files shared with other workers."""
    return bool(os.environ.get(MULTIPROC_ENV))


def _forget_dead_workers(directory: str) -> None:
    """Drop the gauges of workers that died without stopping (SIGKILL, the OOM killer): a worker
    removes its own only when it stops (`Metrics.close`), and a dead one's would show forever,
    e.g. the version it served or its failing reload. Counters stay: what it counted happened."""
    pids = {path.stem.rpartition("_")[2] for path in Path(directory).glob("gauge_live*_*.db")}
    for pid in filter(str.isdigit, pids):
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            # Another worker answering /metrics at the same moment may remove them first.
            with contextlib.suppress(FileNotFoundError):
                multiprocess.mark_process_dead(int(pid), directory)
        except PermissionError:  # alive, another user's
            pass


# Retrieval on CPU takes milliseconds; the upper buckets catch GC pauses and lock waits.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, coverage_window_s: float = 600.0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "remi_http_requests",
            "HTTP requests by endpoint (route template), method and status code.",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "remi_http_request_duration_seconds",
            "HTTP request latency by endpoint (route template).",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # With several workers, a version shows 1 while any worker serves it.
        self.model_info = Gauge(
            "remi_model_info",
            "1 for the model version being served.",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_loaded_at = Gauge(
            "remi_model_loaded_timestamp_seconds",
            "When the served model was loaded (unix time).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.fast_lane = Counter(
            "remi_fast_lane_requests",
            "POST /recommend requests answered by the fast lane (outcome=answered) or handed on "
            "to the FastAPI route (outcome=handed_on: invalid or large bodies, missing or wrong "
            "API keys).",
            ["outcome"],
            registry=r,
        )
        self.recommendations = Counter(
            "remi_recommendations",
            "Users whose answer was computed (single and batch entries).",
            registry=r,
        )
        self.fallbacks = Counter(
            "remi_fallbacks",
            "Users answered by the most-popular fallback (no known history item).",
            registry=r,
        )
        self.unknown_ids = Counter(
            "remi_unknown_item_ids", "History item ids not in the served catalogue.", registry=r
        )
        self.events = Counter("remi_events", "Interactions stored by POST /events.", registry=r)
        self.reloads = Counter(
            "remi_model_reloads",
            "Bundle loads after start-up by result, and a `current` rejected at start-up.",
            ["result"],
            registry=r,
        )
        self.reload_failing = Gauge(
            "remi_model_reload_failing",
            "1 while the latest bundle load failed and an older model keeps serving.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.redis_errors = Counter(
            "remi_redis_errors", "Requests that failed because Redis was unavailable.", registry=r
        )
        self.batch_users = Histogram(
            "remi_batch_users",
            "Users per encode-and-search batch (requests gathered by the micro-batcher).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.loop_batches = Counter(
            "remi_loop_batches",
            "Batches the event loop computed itself instead of a compute thread "
            "(REMI_BATCH_INLINE_MS, workers with one CPU).",
            registry=r,
        )
        self.interests = InterestSignals(r, coverage_window_s)
        self._version: str | None = None
        # Held by set_model (the loop) and by record_batch's check-and-record (a compute
        # thread): a batch of the replaced model cannot land in the new model's window between.
        self._model_lock = threading.Lock()
        self._write_failed_at = -math.inf

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Around metric writes: one that fails (a shared metrics file that cannot grow on a
        full disk) is logged with its traceback at most once a minute, and the request or the
        reload it belongs to goes on without it."""
        try:
            yield
        except OSError:
            now = time.monotonic()
            if now - self._write_failed_at >= 60.0:
                self._write_failed_at = now
                log.exception("writing a metric failed; going on without it")

    def exposition(self) -> bytes:
        """GET /metrics: this app's metrics, or every worker's under remi-serve --workers N."""
        self.interests.refresh()
        if not shared_across_workers():
            return generate_latest(self.registry)
        _forget_dead_workers(os.environ[MULTIPROC_ENV])
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)

    async def keep_gauges_current(self, interval_s: float = GAUGE_REFRESH_S) -> None:
        """Background task under --workers N: rewrite this worker's windowed gauges (catalogue
        coverage) every interval_s. A worker writes them when it serves a batch or answers a
        scrape; one that does neither (no traffic, and the scraper's keep-alive connection on
        another worker) would show its last window's counts for good."""
        while True:
            await asyncio.sleep(interval_s)
            with self.writing():
                self.interests.refresh()

    def close(self) -> None:
        """This worker is stopping: its gauges leave the shared files (counters stay)."""
        if shared_across_workers():
            multiprocess.mark_process_dead(os.getpid())

    def record_batch(self, version: str, users: int, results: Sequence[Any], on_loop: bool) -> None:
        """Called by the micro-batcher after every batch of a model `version` (in its compute
        thread, or on the loop)."""
        self.batch_users.observe(users)
        if on_loop:
            self.loop_batches.inc()
        self.recommendations.inc(len(results))
        self.fallbacks.inc(sum(r.fallback for r in results))
        self.unknown_ids.inc(sum(len(r.unknown_ids) for r in results))
        with self._model_lock:
            if version == self._version:
                # Not a batch of the model a reload replaced, still computing: its rows are
                # another catalogue's, and counted in the new model's fresh window they showed
                # coverage of items it had never served.
                self.interests.observe(results)

    def set_model(
        self, version: str, loaded_at: float, num_rows: int = 0, num_interests: int = 0
    ) -> None:
        # The new model's state first: a write that fails (a full disk under --workers N) then
        # leaves at worst the old version's 1 beside the new one's, not no version served.
        with self._model_lock:
            previous, self._version = self._version, version
            try:
                self.model_info.labels(version=version).set(1)
                if previous is not None and previous != version:
                    if shared_across_workers():  # series cannot be removed from shared files
                        self.model_info.labels(version=previous).set(0)
                    else:
                        self.model_info.remove(previous)
            finally:
                self.model_loaded_at.set(loaded_at)
                self.interests.set_model(num_rows, num_interests)
