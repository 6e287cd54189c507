"""Cross-request micro-batching: concurrent recommend requests share one encode and one search.

Requests queue up on the event loop; a collector takes the oldest one, waits at most
`max_wait_ms` (measured from that request's arrival) for others to join until the batch holds
`max_users` users, and hands the batch to a free compute thread. While that thread works,
new requests queue, so under load the next batch forms with no added wait (continuous
batching); at low load a request waits at most max_wait_ms. A request is never split: one
larger than max_users runs as a batch of its own.

Continuous batching alone can lock into lopsided batches. With 16 clients that send their next
request as soon as they have an answer, a batch of 14 computes while the 2 answered before it
come back and queue; those 2 then run alone (a batch's fixed costs spread over 2 users) while the
14 come back, and so on: measured batches of 2 and 14 alternating, 3.4 ms of compute per user in
the small ones against 1.1 ms in the large. So when a thread frees up with fewer requests queued
than half of what the last batch plus the queue hold, the collector waits up to `balance_ms` (from
that moment) for the answered clients to come back, and the batches even out (8 and 8). At
concurrency 1 the queue already holds what the last batch held, so nothing waits. Requests, not
users, since a client has one request in flight: counted in users, a lone client's single after
its batch of 50 waited out the whole window for 25 users that nobody would send.

Everything CPU-heavy happens in a compute thread: encode, search, merge, and `render` (each
caller's function that turns its results into response bytes), so the loop only parses
requests and moves bytes. With `workers` > 1 compute threads (one torch thread each) batches run
side by side, which puts a small host's cores to work with the compiled exact search (it leaves
the GIL) and degrades gently when the cores are shared (no OpenMP barriers). `parallel(model)`
caps how many of a model's batches run at once: an index search is better run one batch at a
time, since faiss spreads each batch over the cores itself (see service/app.py).

A worker with one CPU (`remi-serve --workers` as many as the cores, or a one-CPU container)
has nothing to gain from handing batches to its one compute thread: the loop and the thread take
turns on that CPU anyway, and each hand-off costs a thread wake-up and the GIL passing back and
forth. There (`inline_ms` > 0) a batch of plain requests (n <= INLINE_MAX_N, no explanations, no
diversity) expected to take at most `inline_ms` runs on the event loop itself, expected from the
CPU time per user of the model's last plain batches; measured with two workers on two cores at
100k items, 1.05-1.14x the requests/s at 16 clients with a lower p99 (docs/serving.md).
Everything else, and any batch while the thread computes one, still goes to the thread, so the
loop is never blocked for longer than `inline_ms` and /healthz stays responsive beside heavy
requests.

If a batch fails, its requests are retried one by one, so a failing request fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from service.errors import ClientGone, ShuttingDown
from service.recommender import LoadedModel, Result, recommend_batch

log = logging.getLogger(__name__)

Render = Callable[[list[Result]], Any]

# The deepest n of a request the event loop computes itself: beyond it a user's search and
# response cost much more than the plain batches the loop's estimate is measured on.
INLINE_MAX_N = 100
# Weight of the newest batch in the estimated time per user.
_COST_WEIGHT = 0.2
# A metrics fault repeats on every batch: its traceback once a minute is enough to act on.
_METRICS_LOG_EVERY_S = 60.0


def _abandon(future: asyncio.Future, client_gone: asyncio.Future) -> None:
    """The client went away (`client_gone` is done; cancelled means it was not watched)."""
    if client_gone.cancelled() or future.done():
        return
    future.set_exception(ClientGone("the client closed the connection before the answer"))


@dataclass(eq=False)
class _Job:
    model: LoadedModel
    histories: list[Sequence[str]]  # the request's own lists, copied in the compute thread
    n: list[int]
    exclude_history: list[bool]
    explain: list[bool]
    diversity: list[float]
    render: Render
    future: asyncio.Future = field(repr=False)
    arrived: float = 0.0
    # Costs about what every plain request costs per user (see `INLINE_MAX_N`); read when the
    # batch is placed and again when its time is measured.
    plain: bool = field(init=False)

    def __post_init__(self) -> None:
        self.plain = (
            max(self.n, default=0) <= INLINE_MAX_N
            and not any(self.explain)
            and not any(self.diversity)
        )

    def __len__(self) -> int:
        return len(self.histories)


@dataclass
class BatchStats:
    """What the last batches looked like (for metrics and tests)."""

    batches: int = 0
    users: int = 0
    largest: int = 0

    def record(self, users: int) -> None:
        self.batches += 1
        self.users += users
        self.largest = max(self.largest, users)


class MicroBatcher:
    """Gathers concurrent requests into batches and runs them in `workers` compute threads, at
    most `parallel(model)` batches of a model at once (default: as many as there are threads);
    with one thread and `inline_ms` > 0, small batches of plain requests on the event loop."""

    def __init__(
        self,
        max_wait_ms: float,
        max_users: int,
        on_batch: Callable[[str, int, list[Result], bool], None] | None = None,
        workers: int = 1,
        balance_ms: float = 0.0,
        parallel: Callable[[LoadedModel], int] | None = None,
        inline_ms: float = 0.0,
    ) -> None:
        if min(max_wait_ms, balance_ms, inline_ms) < 0 or max_users < 1 or workers < 1:
            raise ValueError(
                "max_wait_ms, balance_ms and inline_ms must be >= 0, max_users and workers >= 1"
            )
        if inline_ms > 0 and workers > 1:
            raise ValueError("inline_ms is for one compute thread: the loop would stall the others")
        self.max_wait_s = max_wait_ms / 1000
        self.balance_s = balance_ms / 1000
        self.inline_s = inline_ms / 1000
        self.max_users = max_users
        self._last_batch = 0  # requests in the batch dispatched last
        # (model, seconds per user) of its recent plain batches, on the loop or in the thread:
        # one tuple, replaced whole, as a compute thread writes it and the loop reads it. The
        # model by weak reference: after a reload the old one goes as soon as requests let go.
        self._cost: tuple[weakref.ref[LoadedModel], float] | None = None
        # called after each batch with (its model's version, users, results, on the loop)
        self.on_batch = on_batch
        self._metrics_logged_at = -math.inf  # time.monotonic() of the last on_batch failure logged
        self.stats = BatchStats()
        self._queue: deque[_Job] = deque()
        self._queued_users = 0
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="remi-compute")
        self.workers = workers
        self._parallel = parallel or (lambda model: workers)
        self._computing = 0  # batches handed to a thread and not yet back
        self._computed = asyncio.Event()  # set each time one comes back
        self._running: set[asyncio.Task] = set()
        self._stats_lock = threading.Lock()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> MicroBatcher:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def start(self) -> None:
        """Start collecting (call from the event loop that will submit)."""
        self._task = asyncio.create_task(self._collect(), name="remi-batcher")
        self._task.add_done_callback(self._stopped)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _stopped(self, task: asyncio.Task) -> None:
        """The collector ends only when cancelled; should a bug end it, say so and fail what is
        queued (503) instead of leaving those requests to hang."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("the batcher stopped; this worker answers 503", exc_info=task.exception())
        self._fail_queued(ShuttingDown("the batcher stopped; see the server log"))

    def _fail_queued(self, exc: Exception) -> None:
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(exc)
        self._queue.clear()
        self._queued_users = 0

    async def aclose(self) -> None:
        """Stop collecting, fail what is still queued, and wait for the running batch."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # a bug that ended it is logged (`_stopped`)
        await asyncio.gather(*self._running, return_exceptions=True)
        self._fail_queued(ShuttingDown("the service is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(
        self,
        model: LoadedModel,
        histories: Sequence[Sequence[str]],
        n: Sequence[int],
        exclude_history: Sequence[bool],
        explain: Sequence[bool],
        render: Render,
        diversity: Sequence[float] | None = None,
        client_gone: asyncio.Future | None = None,
    ) -> Any:
        """Queue one request (one or more users) and return render(its results).
        `diversity`: lambda per user (remi_core/diversity.py), default 0 (Eq. 7).
        `client_gone`: done when the client has gone away; the request then leaves the queue,
        so nothing is computed for nobody, and raises ClientGone."""
        if not self.running:
            raise ShuttingDown("the service is not running (starting or shutting down)")
        loop = asyncio.get_running_loop()
        job = _Job(
            model,
            list(histories),
            list(n),
            list(exclude_history),
            list(explain),
            [0.0] * len(histories) if diversity is None else list(diversity),
            render,
            loop.create_future(),
            loop.time(),
        )
        self._queue.append(job)
        self._queued_users += len(job)
        self._arrived.set()
        if client_gone is not None:
            client_gone.add_done_callback(partial(_abandon, job.future))
        return await job.future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._computing_fewer_than(self.workers)  # a batch forms when a thread is free
            free_at = loop.time()
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            if await self._computing_fewer_than(self.batches_at_once(self._queue[0].model)):
                free_at = loop.time()
            # Fill up to max_users until the oldest request's max_wait runs out; and, right after
            # a thread frees up, up to an even share of the last batch (see the module docstring).
            deadline = self._queue[0].arrived + self.max_wait_s
            even_share = (self._last_batch + len(self._queue) + 1) // 2  # requests
            balance_deadline = free_at + self.balance_s
            while self._queued_users < self.max_users:
                now = loop.time()
                if len(self._queue) < even_share and now < balance_deadline:
                    remaining = max(deadline, balance_deadline) - now
                else:
                    remaining = deadline - now
                if remaining <= 0:
                    break
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
            if self._start(self._take(), loop):
                # Let the answers go out, and /healthz in, before the next batch: with a backlog
                # nothing below awaits, and back-to-back batches would block the loop for
                # several times inline_ms.
                await asyncio.sleep(0)

    def _start(self, jobs: list[_Job], loop: asyncio.AbstractEventLoop) -> bool:
        """Compute a batch on the loop if it fits there (True), else hand it to a compute
        thread. Apart from `_collect` so that the collector, waiting for the next batch, holds
        no job of this one: after a reload that would keep the old model alive."""
        if not jobs:  # every one taken was answered already: its client went away
            return False
        self._last_batch = len(jobs)
        if self._fits_on_loop(jobs, sum(len(job) for job in jobs)):
            try:
                outcomes = self._compute(jobs, on_loop=True)
            except Exception as exc:  # as in _dispatch: fail these, keep collecting
                outcomes = [exc] * len(jobs)
            self._deliver(jobs, outcomes)
            return True
        # Hand the batch to the thread here, not in the task below: a new task runs only
        # after every callback already queued on the loop, and when a batch has just been
        # answered those are its requests sending their responses (2.3 ms of an idle
        # compute thread per batch of 8, measured).
        computed = loop.run_in_executor(self._executor, self._compute, jobs)
        self._computing += 1
        task = asyncio.create_task(self._dispatch(jobs, computed))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return False

    def _fits_on_loop(self, jobs: list[_Job], users: int) -> bool:
        """Whether the loop computes this batch itself (see the module docstring)."""
        if not self.inline_s or self._computing or not all(job.plain for job in jobs):
            return False
        cost = self._cost
        if cost is None or any(job.model is not cost[0]() for job in jobs):
            return False  # nothing measured for this model yet: the thread measures it
        return cost[1] * users <= self.inline_s

    def batches_at_once(self, model: LoadedModel) -> int:
        """How many batches of `model` may compute at the same time."""
        return min(self.workers, self._parallel(model))

    async def _computing_fewer_than(self, limit: int) -> bool:
        """Wait until fewer than `limit` batches are computing; True if that meant waiting."""
        waited = False
        while self._computing >= limit:
            self._computed.clear()
            await self._computed.wait()
            waited = True
        return waited

    async def _dispatch(self, jobs: list[_Job], computed: asyncio.Future) -> None:
        try:
            outcomes = await computed
        except Exception as exc:  # the executor itself failed: fail these, keep serving
            outcomes = [exc] * len(jobs)
        finally:
            self._computing -= 1
            self._computed.set()
        self._deliver(jobs, outcomes)

    @staticmethod
    def _deliver(jobs: list[_Job], outcomes: list[tuple[Any] | BaseException]) -> None:
        for job, outcome in zip(jobs, outcomes, strict=True):
            if job.future.done():  # the client went away
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome[0])

    def _take(self) -> list[_Job]:
        """The oldest jobs that fit in max_users, less those already answered (their client
        went away): at least one unless every queued job was."""
        jobs: list[_Job] = []
        users = 0
        while self._queue and (not jobs or users + len(self._queue[0]) <= self.max_users):
            job = self._queue.popleft()
            self._queued_users -= len(job)
            if not job.future.done():
                jobs.append(job)
                users += len(job)
        return jobs

    def _compute(self, jobs: list[_Job], on_loop: bool = False) -> list[tuple[Any] | BaseException]:
        """Runs in the compute thread (or on the loop): one recommend_batch per model, then each
        job's render. Returns per job (rendered,) or the exception that job alone raised."""
        outcomes: dict[int, tuple[Any] | BaseException] = {}
        by_model: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            # Requests that resolved different models (a reload in between) batch separately.
            by_model.setdefault(id(job.model), []).append(i)
        for members in by_model.values():
            group = [jobs[i] for i in members]
            # CPU time, not wall time: in the thread, a batch's wall time includes the turns the
            # loop takes on the worker's one CPU, which the batch would not wait for on the loop.
            start = time.thread_time()
            try:
                results = self._run(group, on_loop)
            except Exception as exc:
                if len(group) == 1:
                    log.exception("recommend request failed")
                    outcomes[members[0]] = exc
                    continue
                log.warning("a batch of %d requests failed; retrying them one by one", len(group))
                for i in members:
                    try:
                        outcomes[i] = (jobs[i].render(self._run([jobs[i]], on_loop)),)
                    except Exception as exc:
                        log.exception("recommend request failed")
                        outcomes[i] = exc
                continue
            first = 0
            for i, job in zip(members, group, strict=True):
                part = results[first : first + len(job)]
                first += len(job)
                try:
                    outcomes[i] = (job.render(part),)
                except Exception as exc:
                    outcomes[i] = exc
            # Per searched user: a popularity fallback costs next to nothing, and a run of them
            # would make a full batch of real users look cheap enough for the loop.
            searched = sum(not result.fallback for result in results)
            if searched and all(job.plain for job in group):
                self._measured(group[0].model, (time.thread_time() - start) / searched)
        return [outcomes[i] for i in range(len(jobs))]

    def _measured(self, model: LoadedModel, per_user: float) -> None:
        """Fold a plain batch's seconds per user into the model's estimate."""
        cost = self._cost
        if cost is not None and cost[0]() is model:
            per_user = (1 - _COST_WEIGHT) * cost[1] + _COST_WEIGHT * per_user
        self._cost = (weakref.ref(model), per_user)

    def _run(self, group: list[_Job], on_loop: bool) -> list[Result]:
        results = recommend_batch(
            group[0].model,
            # Copied here, not on the loop: a batch of 256 histories of 1000 ids is 256,000
            # references to take and drop again, milliseconds of the loop's time; and a request
            # whose client left may have its lists emptied (service/body.py) while this runs.
            [list(h) for job in group for h in job.histories],
            n=[k for job in group for k in job.n],
            exclude_history=[e for job in group for e in job.exclude_history],
            explain=[x for job in group for x in job.explain],
            diversity=[lam for job in group for lam in job.diversity],
        )
        users = len(results)
        with self._stats_lock:
            self.stats.record(users)
        if self.on_batch is not None:
            try:
                self.on_batch(group[0].model.version, users, results, on_loop)
            except Exception:
                # The answers stand: raising here would retry the batch one request at a time
                # (each failing the same way) and count its users again, so a metrics fault (a
                # multiprocess metrics file that cannot be opened, say) would fail every request.
                self._metrics_failed()
        return results

    def _metrics_failed(self) -> None:
        """Log a failed `on_batch`, with its traceback, at most once a minute."""
        now = time.monotonic()
        if now - self._metrics_logged_at >= _METRICS_LOG_EVERY_S:
            self._metrics_logged_at = now
            log.exception("recording a batch's metrics failed; its answers are sent anyway")
