"""Production signals of the interests: is routing collapsing, how do lists spread over the
interest slots and over the catalogue (Prometheus, on the app's metrics registry).

- `remi_routing_peak`: per answered user whose encoded window holds at least 2 items, the mean
  over interests of the largest routing weight (the training report's routing-collapse measure,
  on live traffic). 1/L means interests that average the window; near 1, every interest is one
  history item. One-item windows are left out: their weight is 1 whatever the model.
- `remi_items_by_interest_total{interest}`: returned items per interest slot that produced them.
- `remi_catalogue_coverage` and `remi_served_items_distinct{window}`: distinct items served in
  rotating windows of REMI_COVERAGE_WINDOW_S seconds, counted exactly with one flag per catalogue
  row (memory: one byte per item), reset when another model is loaded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import Protocol

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# 1/L for the usual windows (L = 20: 0.05) up to a fully collapsed 1.0.
ROUTING_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Served(Protocol):
    """What the signals read from one user's answer."""

    fallback: bool
    rows: np.ndarray  # (n,) catalogue rows returned
    interests: Sequence[int] | None  # the interest slot that produced each item; None: fallback
    routing_peak: float | None  # None: fallback, no routing matrix, or a one-item window


class CoverageWindow:
    """Distinct rows served in the current window and in the last complete one; thread-safe."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._lock = threading.Lock()
        self.reset(0)

    def reset(self, num_rows: int) -> None:
        with self._lock:
            self._seen = np.zeros(num_rows, dtype=bool)
            self._current = 0
            self._last: int | None = None
            self._started = self.clock()

    def _rotate(self) -> None:
        # A window with no traffic ends at the next call; any gap longer than one window means the
        # last complete window saw nothing.
        elapsed = self.clock() - self._started
        if elapsed < self.seconds:
            return
        self._last = self._current if elapsed < 2 * self.seconds else 0
        self._seen[:] = False
        self._current = 0
        self._started += (elapsed // self.seconds) * self.seconds

    def add(self, rows: np.ndarray) -> None:
        with self._lock:
            self._rotate()
            rows = rows[(rows > 0) & (rows < len(self._seen))]
            fresh = np.unique(rows[~self._seen[rows]])
            self._seen[fresh] = True
            self._current += len(fresh)

    def current(self) -> int:
        with self._lock:
            self._rotate()
            return self._current

    def last(self) -> int | None:
        """The last complete window's count; None until one has ended."""
        with self._lock:
            self._rotate()
            return self._last

    def coverage(self) -> float:
        """Share of real items (row 0 is padding) served in the last complete window, or the
        current one before the first ends."""
        last = self.last()
        items = max(1, len(self._seen) - 1)
        return (self.current() if last is None else last) / items


class InterestSignals:
    def __init__(self, registry: CollectorRegistry, window_s: float) -> None:
        self.routing_peak = Histogram(
            "remi_routing_peak",
            "Per answered user with an encoded window of 2+ items: mean over interests of the "
            "largest routing weight (near 1: collapsed routing).",
            buckets=ROUTING_BUCKETS,
            registry=registry,
        )
        self.items_by_interest = Counter(
            "remi_items_by_interest",
            "Returned items by the interest slot that produced them (fallback items excluded).",
            ["interest"],
            registry=registry,
        )
        self.window = CoverageWindow(window_s)
        # Set after every batch and before every scrape rather than computed at scrape time
        # (set_function): with several workers, /metrics reads every worker's last values from
        # the shared files (service/metrics.py), and a worker's largest counts stand for all.
        self.coverage = Gauge(
            "remi_catalogue_coverage",
            "Share of the catalogue among the distinct items served in the last complete window "
            "of REMI_COVERAGE_WINDOW_S (the current window before the first one ends).",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.distinct = Gauge(
            "remi_served_items_distinct",
            "Distinct items served in the current window and in the last complete one.",
            ["window"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.refresh()

    def refresh(self) -> None:
        """Write the coverage window's counts into the gauges (a window may have ended)."""
        self.coverage.set(self.window.coverage())
        self.distinct.labels(window="current").set(self.window.current())
        self.distinct.labels(window="last").set(self.window.last() or 0)

    def set_model(self, num_rows: int, num_interests: int) -> None:
        """A new model: coverage starts over; every slot gets a series (a zero is information)."""
        self.window.reset(num_rows)
        self.refresh()
        for k in range(num_interests):
            self.items_by_interest.labels(interest=str(k))

    def observe(self, results: Iterable[Served]) -> None:
        """Record one batch of answers (called in the compute thread: a few array operations
        per batch, not per item)."""
        results = list(results)
        if not results:
            return
        self.window.add(np.concatenate([r.rows for r in results]))  # fallback items are served too
        self.refresh()
        answered = [r for r in results if not r.fallback and r.interests is not None]
        for result in answered:
            if result.routing_peak is not None:
                self.routing_peak.observe(result.routing_peak)
        slots = np.fromiter(chain.from_iterable(r.interests for r in answered), dtype=np.int64)
        for k, count in enumerate(np.bincount(slots).tolist()):
            if count:
                self.items_by_interest.labels(interest=str(k)).inc(count)
