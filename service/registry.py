"""Holds the model being served and swaps in new bundles (hot reload)."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from remi_core.bundle import BundleError, current_version, resolve_current
from service.errors import ModelNotLoaded
from service.metrics import Metrics
from service.recommender import LoadedModel, load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReloadOutcome:
    reloaded: bool
    version: str | None  # the version serving after the attempt
    previous: str | None
    target: str | None  # what `current` pointed at
    error: str | None = None


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
        self._checked: str | None = None  # `current`'s target at the last full check
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
        """Load `current` at start-up; a BundleError here must stop the service."""
        path = resolve_current(self.root)
        model = load_model(path, self.device, self.verify, self.exact_search)
        self._swap(model, path.name)
        self._checked = path.name
        return model

    async def reload(self, force: bool = False) -> ReloadOutcome:
        """Load `current` if it moved. Without `force`, a target that already failed is skipped
        (versions are immutable, so retrying it every poll would only repeat the error)."""
        async with self._lock:
            self._checked = self._link_target()
            self.last_check_at = time.time()
            previous = self._model.version if self._model else None
            try:
                path = resolve_current(self.root)  # read the link once: target and path agree
            except (BundleError, OSError) as exc:
                return self._failed(previous, None, str(exc))
            target = path.name
            if target == self._name:
                # `current` is back on the served bundle (e.g. rolled back after a rejected
                # one): nothing is pending, so an earlier failure no longer applies.
                self._clear_failure()
                return ReloadOutcome(False, previous, previous, target)
            if target == self.failed_target and not force:
                return ReloadOutcome(False, previous, previous, target, self.last_error)
            log.info("loading bundle %s (serving %s)", path, previous)
            # Loading verifies checksums and runs a test query: seconds for big catalogues, so
            # it runs in a thread while the old model keeps answering.
            model = await anyio.to_thread.run_sync(self._load, path)
            if isinstance(model, str):
                return self._failed(previous, target, model)
            self._swap(model, target)
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
        self.metrics.set_model(
            model.version, model.loaded_at, len(model.item_ids), model.num_interests
        )
        self._clear_failure()

    def _clear_failure(self) -> None:
        self.last_error = None
        self.failed_target = None
        self.metrics.reload_failing.set(0)

    def _failed(self, previous: str | None, target: str | None, error: str) -> ReloadOutcome:
        if error != self.last_error:  # a poller hitting the same problem logs it once
            log.error("bundle %s rejected, still serving %s: %s", target, previous, error)
        self.last_error = error
        self.failed_target = target
        self.metrics.reloads.labels(result="failure").inc()
        self.metrics.reload_failing.set(1)
        return ReloadOutcome(False, previous, previous, target, error)

    def _link_target(self) -> str | None:
        try:
            return current_version(self.root)
        except OSError:
            return None

    def settled(self) -> bool:
        """Whether `current` still names what the last full check found: one readlink, cheap
        enough for every worker to run several times a second. A target that failed stays
        settled until `current` moves (or /admin/reload), as before: versions are immutable."""
        target = self._link_target()
        self.last_check_at = time.time()
        return self.loaded and target == self._checked

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
