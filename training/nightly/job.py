"""The nightly job: fold streamed events into the data, retrain, and publish only if not worse.

One run of `run_nightly` (the `remi-train nightly` command) is a one-shot, idempotent job. Its
steps, which `_run_steps` below takes in this order (and docs/operations.md links here):

1. **Lock.** Take the Redis lock (SET NX PX + heartbeat, lock.py), so two runs never overlap;
   then check that the bundle root and the state directory are writable, so a bad path fails
   in seconds, not after training.
2. **Collect events.** Note the stream's last id *now*, read the events after the saved position
   up to it, and save them in the state directory as one CSV named by its stream-id range
   (written atomically; event_log.py). Every later night reads all of these files again,
   deduplicated, so accumulated events keep counting whether or not tonight's model is published.
   Events that left the stream before any run read them (a stream cap, a hand-made XTRIM) are
   counted in the report and a warning, from Redis's count of entries ever added.
3. **Build the dataset.** Base data + accumulated events. Items first seen in events enter the
   catalogue under the same k-core rule as the base data (at least `min_count` interactions).
   Users are split by a hash of their id (`stable_split` in training/data.py), so tonight's
   test users were test users on every earlier night too.
4. **Skip if unchanged.** If the data and training settings equal those of the current bundle,
   there is nothing to retrain (unless `force`); go to step 8.
5. **Train** tonight's model (the same `train()` as `remi-train train`).
6. **Compare.** Evaluate the published bundle, and the newest other versions (the drift
   guard, `baseline_versions`), on the same held-out test users and decide: publish only when
   new >= current - tolerance and new >= the best of those versions - tolerance on
   `compare_metric`, so small losses cannot add up night after night.
7. **Publish** (if the decision says so): write the bundle and swap `current` atomically; then
   prune old versions (never the current one) and old run directories, and ask the service to
   reload.
8. **Commit.** Last of all, advance the saved stream position to the end noted in step 2 and
   trim the consumed part of the stream.

Bootstrap (`run_bootstrap`) takes steps 1 (when given Redis), 3, 5 and 7 on the base data alone,
and only when no bundle is published yet.

Crash safety: nothing observable changes before step 7's single atomic `current` swap, and the
saved position moves only after it. A run killed anywhere before that leaves `current` and the
stream position as they were; the next run re-reads the same events, and the stream-id dedupe
makes that harmless. The lock expires on its own (its TTL) when its holder dies.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from remi_core.atomic import write_json_atomic
from remi_core.bundle import (
    FILES,
    BundleError,
    BundleUnreadable,
    check_current_is_a_link,
    current_version,
    read_manifest,
    resolve_current,
    sha256_of,
    verify_files,
)
from remi_core.index import ROW_OFFSET, check_index_settings, choose_factory
from remi_core.threads import setup_threads
from training.categories import read_categories
from training.data import DataError, SequenceDataset, preprocess, read_interactions, stable_split
from training.nightly import publish
from training.nightly.config import NightlyConfig, NightlyError
from training.nightly.event_log import EventBatch, advance_position, collect
from training.nightly.lock import LockLost, RedisLock
from training.nightly.publish import Outcome
from training.trainer import TrainResult, train

log = logging.getLogger(__name__)

# In the state directory: what the last rejected night was trained on and compared against.
REJECTED = "rejected.json"
SPLIT = "stable"  # recorded in reports and bundle keys: the held-out users are hash-chosen


# --- what the steps return -------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """The bundle `current` points at when the run starts."""

    version: str | None
    manifest: dict[str, Any] | None  # None: nothing published, or its manifest is unreadable
    item_ids: set[str] | None  # its catalogue, for the report's new items


@dataclass(frozen=True)
class NightlyData:
    """Step 3: tonight's dataset and what it was built from."""

    dataset: SequenceDataset
    base_interactions: int
    event_interactions: int
    key: dict[str, Any]  # what identifies this training input (compared in step 4)
    new_items: list[str] | None  # items the published bundle does not know
    base_users: frozenset[str]  # users of the base data (not only brought by tonight's events)

    def report(self) -> dict[str, Any]:
        out = {
            **self.dataset.summary(),
            "split": SPLIT,
            "base_interactions_read": self.base_interactions,
            "event_interactions_read": self.event_interactions,
        }
        if self.new_items is not None:
            out["new_items"] = {"count": len(self.new_items), "sample": self.new_items[:20]}
        return out


@dataclass(frozen=True)
class Trained:
    """Step 5: tonight's run directory and its result."""

    run_dir: Path
    result: TrainResult

    def metrics(self) -> dict[str, dict[str, float]]:
        return {"valid": self.result.valid, "test": self.result.test}


@dataclass
class NightlyRun:
    """One run's record: each step's result as it completes, rendered into the report."""

    cfg: NightlyConfig
    kind: str  # nightly or bootstrap
    client: Any = None  # Redis, or None for a bootstrap without Redis
    lock: RedisLock | None = None
    run_id: str = field(
        default_factory=lambda: f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    )
    started_at: str = field(default_factory=lambda: _now())
    timer: _Timer = field(default_factory=lambda: _Timer())
    published: Published | None = None
    events: EventBatch | None = None
    data: NightlyData | None = None
    trained: Trained | None = None
    comparison: publish.Comparison | None = None
    outcome: Outcome | None = None
    committed: dict[str, Any] | None = None

    def check_lock(self) -> None:
        """Before any visible change: raise LockLost if this run no longer holds the lock,
        saying what this run changed before it (a publish) and what it did not."""
        if self.lock is None:
            return
        try:
            self.lock.check()
        except LockLost as exc:
            published = self.outcome.details.get("published_version") if self.outcome else None
            done = f"{published} was published, but" if published else "nothing was published and"
            raise LockLost(f"{exc}; {done} the stream position was not advanced") from None

    def report(self, status: str, error: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "run_id": self.run_id,
            "started_at": self.started_at,
            "status": status,
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "bundle_root": str(self.cfg.bundle_root),
            "state_dir": str(self.cfg.state_dir),
        }
        if self.published is not None:
            out["previous_version"] = self.published.version
        if self.events is not None:
            out["events"] = {**self.events.report(), **(self.committed or {})}
        if self.data is not None:
            out["data"] = self.data.report()
        if self.trained is not None:
            out["run_dir"] = str(self.trained.run_dir)
            out["training"] = _training_report(self.trained, self.cfg)
        if self.comparison is not None:
            out.update(self.comparison.report())
        if self.outcome is not None:
            out.update(decision=self.outcome.decision, reason=self.outcome.reason)
            out.update(current_version=self.outcome.current_version, **self.outcome.details)
        elif self.published is not None:
            # A failure after `current` moved (the publish's last step, syncing the root) has
            # no outcome: what `current` names now tells whether tonight's model serves.
            with suppress(OSError):
                out["current_version"] = current_version(Path(self.cfg.bundle_root))
        if error is not None:
            out["error"] = error
        out["finished_at"] = _now()
        out["durations_s"] = {**self.timer.durations, "total": self.timer.total()}
        return out


class _Timer:
    def __init__(self) -> None:
        self.durations: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        log.info("nightly: %s", name)
        try:
            yield
        finally:
            self.durations[name] = round(time.perf_counter() - t0, 3)

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 3)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# --- the job -----------------------------------------------------------------------------------


Emit = Callable[[dict[str, Any]], None]


def run_nightly(cfg: NightlyConfig, emit: Emit | None = None) -> dict[str, Any]:
    """One nightly run; returns the report (also written to state_dir/reports/, and given to
    `emit` however the run ends, so a failed run's report is shown too)."""
    if cfg.redis_url is None:
        raise NightlyError("the nightly job needs a Redis URL (events and the lock live there)")
    return _run(cfg, "nightly", emit)


def run_bootstrap(cfg: NightlyConfig, emit: Emit | None = None) -> dict[str, Any]:
    """Train and publish the first bundle on the base data, only if none is published yet.

    Idempotent: with a `current` bundle present it does nothing. It never reads or advances the
    event stream, so the first nightly run still sees every event.
    """
    root = Path(cfg.bundle_root)
    existing = _published_version(root)
    if existing is not None:
        report = {
            "kind": "bootstrap",
            "decision": "exists",
            "reason": f"{root / 'current'} already points at {existing}; nothing to do",
            "current_version": existing,
        }
        if emit is not None:
            emit(report)
        return report
    return _run(cfg, "bootstrap", emit)


def _run(cfg: NightlyConfig, kind: str, emit: Emit | None) -> dict[str, Any]:
    """Step 1 (the lock), the other steps under it, and the report whatever happens."""
    if cfg.torch_threads is not None:  # a fixed count, as --threads: no load following
        setup_threads(cfg.torch_threads)
    run = NightlyRun(cfg, kind)
    if cfg.redis_url is not None:
        run.client = _redis_client(cfg.redis_url)
        run.lock = RedisLock(run.client, cfg.lock_key, cfg.lock_ttl_s)
        try:
            run.lock.acquire()  # LockHeld goes to the caller: refused runs write no report
        except BaseException:
            run.client.close()
            raise
    status, error = "ok", None
    try:
        _run_steps(run)
    except BaseException as exc:
        # A normal failure (not SIGKILL) still leaves a report saying where it stopped.
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        report = run.report(status, error)
        try:
            _write_report(cfg.state_dir, report)
        finally:
            if run.lock is not None:
                run.lock.release()
            if run.client is not None:
                run.client.close()
        if emit is not None:
            try:
                emit(report)  # after the release: a closed stdout must not keep the lock
            except Exception as exc:
                if status == "ok":
                    raise
                log.warning("could not print the report of the failed run: %s", exc)
    return report


def _run_steps(run: NightlyRun) -> None:
    """Steps 2-8 of the module docstring, in order."""
    cfg = run.cfg
    check_writable(Path(cfg.bundle_root), "--bundle-root")
    check_writable(Path(cfg.state_dir), "--state-dir")
    check_current_is_a_link(Path(cfg.bundle_root))  # publishing would refuse it, after training
    run.published = published_bundle(Path(cfg.bundle_root))
    if run.kind == "bootstrap" and _published_version(Path(cfg.bundle_root)) is not None:
        reason = f"{run.published.version} was published meanwhile"
        run.outcome = Outcome("exists", reason, run.published.version)
        return
    if run.kind == "nightly":
        with run.timer.stage("events"):
            run.events = collect(run.client, cfg.stream_key, cfg.position_key, cfg.state_dir)
        if run.events.redis_behind is not None:
            log.warning(
                "Redis's position in %s is behind %s, which this state directory committed: "
                "Redis lost data (a restart without persistence, an older snapshot); events "
                "sent before that may be lost, and how many cannot be told",
                cfg.stream_key,
                run.events.redis_behind,
            )
        if run.events.lost:
            log.warning(
                "%d events left the stream %s before a nightly run read them (trimmed by "
                "REMI_STREAM_MAXLEN or removed by hand); they are missing from training",
                run.events.lost,
                cfg.stream_key,
            )
    with run.timer.stage("data"):
        run.data = build_data(cfg, run.events, run.published)
    skip = skip_reason(cfg, run.data, run.published)
    if skip is not None and current_intact(cfg, run.published):
        run.outcome = Outcome("skipped", skip, run.published.version)
    else:
        check_categories(cfg, run.data.dataset)
        with run.timer.stage("train"):
            run.trained = train_model(cfg, run.data.dataset, run.run_id)
        with run.timer.stage("evaluate_current"):
            new = run.trained.metrics()
            run.comparison = publish.compare(
                cfg,
                new,
                run.published.version,
                run.data.dataset,
                established=(run.trained.run_dir, run.data.base_users),
            )
        with run.timer.stage("publish"):
            run.outcome = publish.publish(run)
        if run.outcome.decision == "rejected":
            record = {"run_id": run.run_id, "key": run.data.key, "current": run.published.version,
                      "rule": verdict_rule(cfg)}  # fmt: skip
            write_json_atomic(Path(cfg.state_dir) / REJECTED, record)
        if run.outcome.decision == "published" and cfg.reload_url:
            run.outcome.details["reload"] = publish.notify_reload(cfg.reload_url, cfg.admin_token)
    commit(run)


def check_categories(cfg: NightlyConfig, dataset: SequenceDataset) -> None:
    """Read the category file against tonight's catalogue, as the export will: a file it cannot
    read (a missing column, bad JSON) failed the run after training, naming no setting."""
    if not cfg.categories:
        return
    try:
        read_categories(Path(cfg.categories), dataset.item_ids, category_col=cfg.category_col)
    except DataError as exc:
        raise NightlyError(f"categories: {exc}") from None


def check_writable(directory: Path, flag: str) -> None:
    """Create `directory` if needed and write (and delete) a file in it, or raise NightlyError."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise NightlyError(f"{flag}: {directory} is not writable ({reason})") from None


def _published_version(root: Path) -> str | None:
    """The version `current` names, if it is there: a `current` naming a version that is gone
    serves nothing, and a bootstrap is still due."""
    version = current_version(root)
    return version if version is not None and (root / version).is_dir() else None


def published_bundle(root: Path) -> Published:
    """What `current` points at now, and its manifest and catalogue when they are readable."""
    version = current_version(root)
    if version is None:
        return Published(None, None, None)
    try:
        manifest = read_manifest(resolve_current(root))
    except BundleUnreadable:
        raise  # permissions or I/O: fail the night before training, not decide on a guess
    except BundleError as exc:
        log.warning("current bundle unreadable: %s", exc)
        return Published(version, None, None)
    item_ids = None
    with suppress(OSError, ValueError):
        path = resolve_current(root) / FILES["item_ids"]
        item_ids = {i for i in json.loads(path.read_text()) if i}
    return Published(version, manifest, item_ids)


def build_data(cfg: NightlyConfig, events: EventBatch | None, published: Published) -> NightlyData:
    """Step 3: base data + accumulated events, preprocessed and split by user-id hash."""
    frame = read_interactions(cfg.data)
    base_count = len(frame)
    base_users = frozenset(frame["user"].astype(str))
    event_count = 0
    if events is not None and len(events.accumulated):
        event_count = len(events.accumulated)
        frame = pd.concat([frame, events.accumulated[["user", "item", "time"]]], ignore_index=True)
    dataset = preprocess(cfg.data, frame)
    dataset.train, dataset.valid, dataset.test = stable_split(dataset.user_ids, cfg.data.split_seed)
    if not len(dataset.valid) or not len(dataset.test):
        raise DataError(
            f"{dataset.name}: {len(dataset.user_ids)} users are too few for a stable 8:1:1 split "
            "(no validation or test user)"
        )
    dataset.extra["split"] = SPLIT
    key = {
        "data_fingerprint": dataset.fingerprint,
        "split": SPLIT,
        "split_seed": cfg.data.split_seed,
        "train_settings": json.loads(json.dumps(asdict(cfg.train))),
        # What the bundle is made of besides the model: a new index or category file was
        # never shipped until new events came (the night was skipped as unchanged).
        "export": {
            "index_factory": cfg.index_factory,
            "search_params": cfg.search_params,
            "recall_target": cfg.recall_target,
            "categories": _digest(cfg.categories) if cfg.categories else None,
            "category_col": cfg.category_col,
        },
    }
    new_items = None
    if published.manifest is not None and published.item_ids is not None:
        new_items = [i for i in dataset.item_ids[1:] if i not in published.item_ids]
    return NightlyData(dataset, base_count, event_count, key, new_items, base_users)


def _digest(path: str) -> str:
    """sha256 of a category file's bytes, as a bundle's files are hashed."""
    try:
        return sha256_of(Path(path))
    except OSError as exc:
        raise NightlyError(f"categories: {path}: {exc.strerror}") from None


def skip_reason(cfg: NightlyConfig, data: NightlyData, published: Published) -> str | None:
    """Step 4: why retraining would be wasted, or None. The current bundle was trained on this
    very data with these settings; or the last night was, and its model was rejected against the
    same current bundle (training is seeded: the same model, the same verdict)."""
    if cfg.force or published.manifest is None:
        return None
    again = "nothing to retrain (use --force to retrain anyway)"
    if published.manifest.get("nightly", {}).get("key") == data.key:
        return (
            f"data and training settings equal those of the current bundle {published.version}; "
            + again
        )
    try:
        rejected = json.loads((Path(cfg.state_dir) / REJECTED).read_text())
    except (OSError, ValueError):
        return None
    if (
        rejected.get("key") == data.key
        and rejected.get("current") == published.version
        and rejected.get("rule") == verdict_rule(cfg)
    ):
        return (
            f"data and training settings equal those of run {rejected.get('run_id')}, whose "
            f"model was rejected against the same current bundle {published.version} by the "
            "same rule; " + again
        )
    return None


def verdict_rule(cfg: NightlyConfig) -> dict[str, Any]:
    """The settings besides the model that decide publish or reject: a rejected night is tried
    again under a different rule (e.g. a tolerance raised to let it through)."""
    return {
        "compare_metric": cfg.compare_metric,
        "tolerance": cfg.tolerance,
        "baseline_versions": cfg.baseline_versions,
    }


def current_intact(cfg: NightlyConfig, published: Published) -> bool:
    """Whether the current bundle's files match their checksums: a damaged one (a restarted API
    could not load it) is replaced, however many nights pass without new events."""
    assert published.manifest is not None
    try:
        verify_files(resolve_current(Path(cfg.bundle_root)), published.manifest)
    except (BundleError, OSError) as exc:
        log.warning("the current bundle %s is damaged; retraining to replace it: %s",
                    published.version, exc)  # fmt: skip
        return False
    return True


def train_model(cfg: NightlyConfig, dataset: SequenceDataset, run_id: str) -> Trained:
    """Step 5: train tonight's model in state_dir/runs/<run id>."""
    if cfg.search_params and not cfg.index_factory:
        # The index comes from tonight's catalogue size: check its search parameters now, not
        # after the training (an exact Flat index, up to EXACT_MAX_ITEMS items, takes none).
        items = len(dataset.item_ids) - ROW_OFFSET
        factory = choose_factory(items)
        try:
            check_index_settings(cfg.train.dim, factory, cfg.search_params, cfg.recall_target)
        except ValueError as exc:
            raise NightlyError(
                f"search_params {cfg.search_params!r} do not fit the {factory} index chosen "
                f"for tonight's {items:,} items (name index_factory to fix it): {exc}"
            ) from None
    run_dir = Path(cfg.state_dir) / "runs" / run_id
    result = train(dataset, cfg.train, run_dir, progress=cfg.progress)
    return Trained(run_dir, result)


def _training_report(trained: Trained, cfg: NightlyConfig) -> dict[str, Any]:
    result = trained.result
    return {
        "best_iteration": result.best_iteration,
        "iterations": result.iterations,
        "seconds": round(result.seconds, 2),
        "settings": asdict(cfg.train),
    }


def commit(run: NightlyRun) -> None:
    """Step 8: advance the saved position to the end read in step 2, then trim the stream."""
    if run.events is None or not run.events.has_new:
        return  # bootstrap, or nothing new was read: never move the position backwards
    with run.timer.stage("commit"):
        run.check_lock()
        run.committed = advance_position(
            run.client, run.cfg.stream_key, run.cfg.position_key, run.events, run.cfg.state_dir
        )


def _redis_client(url: str) -> Any:
    import redis

    # Generous timeouts: a nightly job may wait on a busy Redis, it must not hang forever.
    # A stream entry another writer stored as bytes that are not UTF-8 must not stop every run
    # at the read: decoded with "surrogateescape", it reaches `events_frame`, which skips it.
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        encoding_errors="surrogateescape",
        socket_timeout=30,
        socket_connect_timeout=10,
        protocol=2,  # redis-py 8 speaks RESP3 (HELLO 3) by default, which Redis 5 lacks
    )


def _write_report(state_dir: Path, report: dict[str, Any]) -> None:
    """state_dir/reports/<run id>.json; a report that cannot be written is logged, not raised."""
    directory = Path(state_dir) / "reports"
    path = directory / f"{report['run_id']}.json"
    report["report_path"] = str(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, report)
    except OSError as exc:
        report.pop("report_path")
        log.error("could not write the run report: %s", exc)
