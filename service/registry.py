"""Holds the model being served and swaps in new bundles (hot reload)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from remi_core.bundle import (
    PUBLISHED,
    BundleError,
    created_at,
    current_version,
    published_log,
    published_versions,
    resolve_current,
    rolled_back_from,
)
from service.errors import ModelNotLoaded
from service.metrics import Metrics
from service.recommender import LoadedModel, load_model

log = logging.getLogger(__name__)

# `current`'s target and a stamp of that version's files (name, size, mtime and ctime of each;
# None when the directory cannot be listed): what a check saw.
LinkState = tuple[str | None, tuple[tuple[str, int, int, int], ...] | None]
# A rejected target whose files do not change is tried again after this many seconds, then
# twice as long each time up to RETRY_MAX_S: a failure may pass (memory short just after an OOM
# kill, a network filesystem), and each try of a large bundle costs seconds of hashing.
RETRY_FIRST_S = 30.0
RETRY_MAX_S = 1800.0


@dataclass(frozen=True)
class ReloadOutcome:
    reloaded: bool
    version: str | None  # the version serving after the attempt
    previous: str | None
    target: str | None  # what `current` pointed at
    error: str | None = None


def printable(text: str) -> str:
    """`text` as it can go into JSON and logs: a non-UTF-8 file name (`current` pointed at one)
    is held by Python as lone surrogates, which no UTF-8 encoder takes (/readyz answered 500);
    its bytes are shown as escapes instead."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        try:
            return os.fsencode(text).decode(errors="backslashreplace")
        except UnicodeEncodeError:  # a surrogate that stands for no byte
            return text.encode(errors="backslashreplace").decode()


def load_servable(
    root: Path, device: str, verify: bool, exact_search: str = "auto"
) -> tuple[LoadedModel, Path, str | None]:
    """(model, its version directory, why `current` was rejected or None): `current`'s bundle,
    or, if it cannot serve, the best of `_fallbacks` that can. A worker that the supervisor
    restarts while `current` names a rejected bundle so serves what the other workers still
    serve, instead of failing to start (which makes uvicorn stop them all), and so does a
    restarted container. Raises BundleError when no version can serve."""
    root = Path(root)
    try:
        path = resolve_current(root)
        return load_model(path, device, verify, exact_search), path, None
    except (BundleError, OSError) as exc:
        # The message only: the exception's frames hold what was loaded before it failed.
        error = str(exc)
    for version in _fallbacks(root, current_version(root)):
        path = root / version
        try:
            model = load_model(path, device, verify, exact_search)
        except (BundleError, OSError) as exc:
            log.error("bundle %s cannot serve either: %s", version, exc)
            continue
        return model, path, error
    raise BundleError(error)


def _fallbacks(root: Path, rejected: str | None) -> list[str]:
    """What may serve when `current`, naming `rejected`, cannot: versions published before it
    (in published.log) and created before it, most recently published first. Older only, so
    that a version rolled back from is never served again (nor one whose last publish the log
    shows followed by an older version's, unless published since); none without a `current`
    link or a log, since then nothing says which versions were ever meant to serve."""
    if rejected is None or not (root / PUBLISHED).is_file():
        return []
    try:
        published, named = published_versions(root), published_log(root)
        when = {version: created_at(root / version) for version in published}
        rejected_at = created_at(root / rejected)
        if rejected_at:
            older = {v for v in published if when[v] and when[v] < rejected_at}
        else:
            # Its manifest is gone or damaged, and with it its age: the versions published
            # before it first was; none if the log never named it.
            older = set(named[: named.index(rejected)] if rejected in named else [])
    except OSError:
        return []
    return [v for v in reversed(published) if v in older - rolled_back_from(named, when)]


class ModelRegistry:
    """The served model is one reference, replaced in a single assignment.

    Requests read `registry.model` once and keep that object, so a swap never changes the model
    under a request in flight; the old model is freed when its last request lets go of it.
    """

    def __init__(
        self, root: Path, device: str, verify: bool, metrics: Metrics, exact_search: str = "auto"
    ) -> None:
        self.root = Path(root)
        self.device = device
        self.exact_search = exact_search
        self.verify = verify
        self.metrics = metrics
        self._model: LoadedModel | None = None
        self._name: str | None = None  # `current`'s target when the served model was loaded
        self._checked: LinkState | None = None  # what the last full check saw
        self._seen: LinkState | None = None  # what the last poll saw
        self._failed_state: LinkState | None = None  # what the last failed load saw
        self._retry_wait = 0.0  # seconds from the last failed load to the next try of it
        self._retry_at: float | None = None  # time.monotonic() of that try
        self._lock = asyncio.Lock()  # one load at a time (poller and admin endpoint)
        self.last_error: str | None = None
        self.failed_target: str | None = None
        self.last_check_at: float | None = None

    @property
    def model(self) -> LoadedModel:
        model = self._model
        if model is None:
            raise ModelNotLoaded("no model is loaded yet")
        return model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load_initial(self) -> LoadedModel:
        """Load what `load_servable` finds at start-up, a rejected `current` reported as a
        failed reload would be. Raises BundleError when no version can serve."""
        state = self._state()
        model, path, rejected = load_servable(
            self.root, self.device, self.verify, self.exact_search
        )
        self._swap(model, path.name)
        if rejected is not None:
            self._failed(model.version, state[0], rejected, state)
        self._checked = state
        return model

    async def reload(self, force: bool = False) -> ReloadOutcome:
        """Load `current` if it moved. Without `force`, a target that already failed is skipped
        while its files stay as they were (retrying would only repeat the error); one that was
        missing or half-copied is tried again once its files change."""
        async with self._lock:
            state = self._checked = self._state()
            self.last_check_at = time.time()
            previous = self._model.version if self._model else None
            try:
                path = resolve_current(self.root)  # read the link once: target and path agree
            except (BundleError, OSError) as exc:  # e.g. it names a version that is gone
                return self._failed(previous, state[0], str(exc), state)
            target = printable(path.name)
            if path.name == self._name:
                # `current` is back on the served bundle (e.g. rolled back after a rejected
                # one): nothing is pending, so an earlier failure no longer applies.
                self._clear_failure()
                return ReloadOutcome(False, previous, previous, target)
            if state == self._failed_state and not force and not self._retry_due():
                return ReloadOutcome(False, previous, previous, target, self.last_error)
            log.info("loading bundle %s (serving %s)", path, previous)
            # Loading verifies checksums and runs a test query: seconds for big catalogues, so
            # it runs in a thread while the old model keeps answering.
            model = await anyio.to_thread.run_sync(self._load, path)
            if isinstance(model, str):
                return self._failed(previous, target, model, state)
            self._swap(model, path.name)
            with self.metrics.writing():
                self.metrics.reloads.labels(result="success").inc()
            log.info("now serving bundle %s (was %s)", model.version, previous)
            return ReloadOutcome(True, model.version, previous, target)

    def _load(self, path: Path) -> LoadedModel | str:
        """The loaded model, or why it cannot serve. The error ends here, in the loading
        thread: raised on to the loop, its traceback's frames would hold the half-built model
        (table, index) in a reference cycle that only the cyclic GC can free."""
        try:
            return load_model(path, self.device, self.verify, self.exact_search)
        except BundleError as exc:
            return str(exc)
        except Exception as exc:  # e.g. out of memory: the old model must keep serving
            log.exception("unexpected error loading %s", path)
            return f"{type(exc).__name__}: {exc}"

    def _swap(self, model: LoadedModel, name: str | None) -> None:
        # A catalogue is millions of long-lived objects (ids, the id -> row dict): left to the
        # cyclic GC, each full collection walks them all and stalls every request for tens of
        # ms at 1M items. Frozen, they are skipped (freed by reference counting as usual).
        # Garbage cycles still waiting for a collection would be frozen with them, for good:
        # collected first (9 ms with a 1M-item model loaded beside a frozen one).
        gc.collect()
        gc.freeze()
        self._model = model
        self._name = name
        with self.metrics.writing():
            self.metrics.set_model(
                model.version, model.loaded_at, len(model.item_ids), model.num_interests
            )
        self._clear_failure()

    def _clear_failure(self) -> None:
        self.last_error = None
        self.failed_target = None
        self._failed_state = None
        self._retry_wait, self._retry_at = 0.0, None
        with self.metrics.writing():
            self.metrics.reload_failing.set(0)

    def _retry_due(self) -> bool:
        return self._retry_at is not None and time.monotonic() >= self._retry_at

    def _failed(
        self, previous: str | None, target: str | None, error: str, state: LinkState
    ) -> ReloadOutcome:
        error, target = printable(error), None if target is None else printable(target)
        if error != self.last_error:  # a poller hitting the same problem logs it once
            log.error("bundle %s rejected, still serving %s: %s", target, previous, error)
        # The same target failing again, unchanged: wait twice as long before the next try.
        again = state == self._failed_state
        self._retry_wait = min(2 * self._retry_wait, RETRY_MAX_S) if again else RETRY_FIRST_S
        self._retry_at = time.monotonic() + self._retry_wait
        self.last_error = error
        self.failed_target = target
        self._failed_state = state
        with self.metrics.writing():
            self.metrics.reloads.labels(result="failure").inc()
            self.metrics.reload_failing.set(1)
        return ReloadOutcome(False, previous, previous, target, error)

    def _state(self) -> LinkState:
        """What `current` names now, and a stamp of that version's files. A published version
        never changes, but one that was missing or still being copied when a load failed does
        as it arrives: the stamp tells the poller to try it again (and only then)."""
        try:
            target = current_version(self.root)
        except OSError:
            return None, None
        if target is None:
            return None, None
        try:
            with os.scandir(self.root / target) as entries:
                files = [(entry.name, entry.stat()) for entry in entries]
            stamp = tuple(
                sorted((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for name, st in files)
            )
        except OSError:
            stamp = None
        return target, stamp

    def settled(self) -> bool:
        """Whether `current` and its version's files are as the last full check found them: a
        readlink and a directory listing, cheap enough for every worker to run several times a
        second. A target that failed stays settled until `current` moves, its files change, its
        retry is due (RETRY_FIRST_S, doubling), or /admin/reload forces a retry."""
        state = self._state()
        self.last_check_at = time.time()
        held_still = state == self._seen
        self._seen = state
        if not self.loaded or self._checked is None or state[0] != self._checked[0]:
            return False  # `current` moved: check now
        if self._retry_due():
            return False
        # The same target with its files changed (a version still arriving): tried again once
        # they have held still for one polling interval, not at every poll of a long copy,
        # where each try would hash the files copied so far.
        return state == self._checked or not held_still

    async def poll(self, interval_s: float) -> None:
        """Background task: check `current` every interval_s seconds until cancelled, and load
        it when it moved. Every worker process polls on its own, so a publish or a reload
        through one worker's /admin/reload reaches all of them within about interval_s."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if not self.settled():
                    await self.reload()
            except Exception:  # never let the poller die; the next round tries again
                log.exception("bundle reload check failed")
