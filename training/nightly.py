"""Nightly retraining: fold streamed events into the data, retrain, and publish only if not worse.

One run of `run_nightly` (the `remi-train nightly` command) is a one-shot, idempotent job:

1. Take a Redis lock (SET NX PX + heartbeat), so two runs never overlap.
2. Note the stream's last id *now* and read the events after the saved position up to it.
3. Append them to the state directory as one CSV named by its stream-id range (written
   atomically). Every later night reads all of these files again, deduplicated by stream id, so
   the accumulated events keep counting whether or not tonight's model is published.
4. Build tonight's dataset: base data + accumulated events. Items first seen in events enter the
   catalogue under the same k-core rule as the base data (at least `min_count` interactions).
5. Train, evaluate on held-out users, evaluate the published bundle on the same users, and
   publish only when new >= current - tolerance on the comparison metric.
6. Prune old versions (never the current one), then, last of all, advance the saved position
   and trim the consumed part of the stream.

Crash safety: nothing observable changes before step 5's single atomic `current` swap, and the
saved position moves only after it. A run killed anywhere before that leaves `current` and the
stream position as they were; the next run re-reads the same events, and the stream-id dedupe
makes that harmless. The lock expires on its own (its TTL) when its holder dies.

Held-out users are chosen by a hash of the user id ("stable" split), not by the official
shuffle, because the shuffle reassigns every user whenever a new user appears: the published
model would then be scored on users it trained on, which makes a fair comparison impossible.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from remi_core.atomic import atomic_file, write_json_atomic
from remi_core.bundle import (
    BundleError,
    current_version,
    load_bundle,
    prune,
    read_manifest,
    resolve_current,
    set_current,
)
from remi_core.events import EVENTS_STREAM
from training.data import (
    DataConfig,
    DataError,
    SequenceDataset,
    preprocess,
    read_interactions,
)
from training.evaluate import CUTOFFS
from training.export import evaluate_bundle, export_run
from training.trainer import TrainConfig, train

log = logging.getLogger(__name__)

SPLITS = ("stable", "official")
EVENT_COLUMNS = ("stream_id", "user", "item", "time")


class NightlyError(RuntimeError):
    """The nightly job cannot run as configured (bad settings, no data, ...)."""


class LockHeld(NightlyError):
    """Another run holds the nightly lock."""


class LockLost(NightlyError):
    """This run's lock expired or was taken over; it must not publish or advance the position."""


@dataclass(frozen=True)
class NightlyConfig:
    """Everything one nightly (or bootstrap) run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    """Base interactions (the same settings as `remi-train train`)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training settings for tonight's model."""
    bundle_root: Path = Path("artifacts/bundles")
    """Bundle root holding the versions and `current`."""
    state_dir: Path = Path("artifacts/nightly")
    """Accumulated events (events/), run directories (runs/) and reports (reports/)."""
    redis_url: str | None = "redis://localhost:6379/0"
    """Redis with the event stream and the lock; None: no events, no lock (bootstrap only)."""
    stream_key: str = EVENTS_STREAM
    """Stream the service appends events to."""
    position_key: str = "remi:nightly:position"
    """Redis key holding the last stream id this job consumed."""
    lock_key: str = "remi:nightly:lock"
    """Redis key of the lock that refuses overlapping runs."""
    lock_ttl_s: float = 300.0
    """Lock expiry; a heartbeat extends it every ttl/3 while the run is alive."""
    tolerance: float = 0.01
    """Publish when new >= current - tolerance on compare_metric (absolute)."""
    compare_metric: str = "recall@50"
    """Metric of the publish decision."""
    compare_split: str = "test"
    """Held-out users of the decision: test (never used for early stopping) or valid."""
    split: str = "stable"
    """User split: 'stable' (hash of the user id, same users held out every night) or 'official'."""
    retention: int = 5
    """Keep the newest this many versions (plus `current`, whatever its age)."""
    keep_runs: int = 2
    """Training run directories kept under state_dir/runs."""
    index_factory: str = "Flat"
    """Faiss index factory of published bundles."""
    search_params: str = ""
    """Faiss search parameters of published bundles."""
    trim_stream: bool = True
    """Trim consumed events from the stream once they are saved in the state directory."""
    reload_url: str | None = None
    """Service base URL; after publishing, POST <url>/admin/reload (best effort; it polls too)."""
    admin_token: str | None = None
    """Bearer token for the reload call."""
    force: bool = False
    """Retrain even when the data and settings equal those of the current bundle."""
    progress: bool = False
    """Show the training progress bar."""
    torch_threads: int | None = None
    """Intra-op threads for torch; None keeps torch's default (all cores it sees). Set it where
    the job shares cores or a container's CPU quota is below the host's core count, where the
    default oversubscribes and training gets several times slower."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise NightlyError(f"split must be one of {SPLITS}, not {self.split!r}")
        if self.compare_split not in ("valid", "test"):
            raise NightlyError(
                f"compare_split must be 'valid' or 'test', not {self.compare_split!r}"
            )
        if self.retention < 1:
            raise NightlyError("retention must be at least 1")
        if self.lock_ttl_s <= 0:
            raise NightlyError("lock_ttl_s must be positive")
        if self.tolerance < 0:
            raise NightlyError("tolerance must not be negative")
        metrics = [f"{m}@{n}" for m in ("recall", "hitrate", "ndcg") for n in CUTOFFS]
        if self.compare_metric not in metrics:
            raise NightlyError(
                f"compare_metric must be one of {metrics}, not {self.compare_metric!r}"
            )

    @classmethod
    def scalar_fields(cls) -> set[str]:
        """Settings that a config file's `nightly:` section may set."""
        return {f.name for f in fields(cls)} - {"data", "train"}


# --- the lock -------------------------------------------------------------------------------------

# Compare-and-act scripts: only the holder's token may extend or delete the lock, so a run whose
# lock already expired (and was taken by another run) cannot release or extend someone else's.
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class RedisLock:
    """A lock with expiry: SET key token NX PX ttl, a heartbeat thread, compare-and-delete release.

    If the holder is SIGKILLed the heartbeat stops with it and the key expires after the TTL, so
    a crashed run blocks the next one for at most one TTL.
    """

    def __init__(self, client: Any, key: str, ttl_s: float) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        if not self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
            holder = self.client.get(self.key)
            ttl_ms = self.client.pttl(self.key)
            expires = f"expires in {ttl_ms / 1000:.1f} s" if ttl_ms and ttl_ms > 0 else "expiring"
            raise LockHeld(
                f"another nightly run holds the lock {self.key!r} (holder {holder}, {expires}); "
                f"refusing to overlap. If that run died, the lock frees itself when it expires."
            )
        self._thread = threading.Thread(target=self._heartbeat, name="nightly-lock", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        interval = self.ttl_ms / 3000
        while not self._stop.wait(interval):
            try:
                if not self.client.eval(_EXTEND, 1, self.key, self.token, self.ttl_ms):
                    self.lost = True
                    log.error("lost the nightly lock %s; this run will not publish", self.key)
                    return
            except Exception as exc:  # a Redis blip: try again next beat, check() decides
                log.warning("could not extend the nightly lock: %s", exc)

    def check(self) -> None:
        """Raise LockLost unless this run still holds the lock (call before any commit step)."""
        if self.lost or self.client.get(self.key) != self.token:
            self.lost = True
            raise LockLost(
                f"the nightly lock {self.key!r} expired or was taken over during the run; "
                "nothing was published and the stream position was not advanced"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.client.eval(_RELEASE, 1, self.key, self.token)
        except Exception as exc:  # it expires anyway
            log.warning("could not release the nightly lock: %s", exc)

    def __enter__(self) -> RedisLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --- events ---------------------------------------------------------------------------------------


def _parse_id(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _next_id(stream_id: str) -> str:
    """The smallest id after stream_id (an exclusive XRANGE start that works on any Redis)."""
    ms, seq = _parse_id(stream_id)
    return f"{ms}-{seq + 1}"


def read_position(client: Any, cfg: NightlyConfig) -> str:
    return client.get(cfg.position_key) or "0-0"


def read_stream(
    client: Any, key: str, after: str, end: str, page: int = 10_000
) -> Iterator[tuple[str, dict[str, str]]]:
    """Entries with after < id <= end, oldest first, in pages."""
    start = _next_id(after)
    while True:
        batch = client.xrange(key, min=start, max=end, count=page)
        yield from batch
        if len(batch) < page:
            return
        start = _next_id(batch[-1][0])


def events_frame(entries: list[tuple[str, dict[str, str]]]) -> tuple[pd.DataFrame, int]:
    """(stream_id, user, item, time) rows from stream entries, and how many were malformed."""
    rows, bad = [], 0
    for stream_id, data in entries:
        try:
            user, item = str(data["user_id"]), str(data["item_id"])
            ts = float(data["timestamp"])
        except (KeyError, TypeError, ValueError):
            bad += 1
            continue
        if not user.strip() or not item.strip() or not np.isfinite(ts):
            bad += 1
            continue
        rows.append((stream_id, user, item, ts))
    return pd.DataFrame(rows, columns=list(EVENT_COLUMNS)), bad


def save_events(state_dir: Path, frame: pd.DataFrame) -> Path | None:
    """Write a batch of events as state_dir/events/events-<first id>--<last id>.csv, atomically.

    Files are never rewritten; a re-read range (after a crash) lands in a file with the same
    name, which is simply replaced by identical content.
    """
    if frame.empty:
        return None
    directory = Path(state_dir) / "events"
    directory.mkdir(parents=True, exist_ok=True)
    first, last = frame["stream_id"].iloc[0], frame["stream_id"].iloc[-1]
    path = directory / f"events-{first}--{last}.csv"
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False, columns=list(EVENT_COLUMNS), quoting=csv.QUOTE_NONNUMERIC)
    return path


def load_events(state_dir: Path) -> tuple[pd.DataFrame, int]:
    """All accumulated events, deduplicated; and how many duplicates were dropped.

    Dedupe by stream id (a range read twice after a crash), then by (user, item, time): the
    service delivers at least once, so a client retry can store the same event under two ids.
    """
    files = sorted((Path(state_dir) / "events").glob("events-*.csv"))
    if not files:
        return pd.DataFrame(columns=list(EVENT_COLUMNS)), 0
    frames = [
        pd.read_csv(f, dtype={"stream_id": str, "user": str, "item": str}, keep_default_na=False)
        for f in files
    ]
    frame = pd.concat(frames, ignore_index=True)
    before = len(frame)
    frame["time"] = frame["time"].astype(float)
    frame = frame.drop_duplicates("stream_id").drop_duplicates(["user", "item", "time"])
    ms_seq = frame["stream_id"].str.split("-", expand=True).astype("int64")
    frame = frame.iloc[np.lexsort((ms_seq[1], ms_seq[0]))].reset_index(drop=True)
    return frame, before - len(frame)


# --- data -----------------------------------------------------------------------------------------


def stable_split(dataset: SequenceDataset, seed: int) -> None:
    """Reassign train/valid/test 8:1:1 by a hash of each user id, in place.

    A user's split depends on nothing but its id, so a user held out tonight was held out on
    every earlier night, and the published model has never trained on tonight's test users.
    """
    buckets = np.array(
        [
            int.from_bytes(hashlib.sha256(f"{seed}:{user}".encode()).digest()[:8], "big") % 10
            for user in dataset.user_ids
        ],
        dtype=np.int64,
    )
    dataset.train = np.flatnonzero(buckets < 8).astype(np.int64)
    dataset.valid = np.flatnonzero(buckets == 8).astype(np.int64)
    dataset.test = np.flatnonzero(buckets == 9).astype(np.int64)
    if not len(dataset.valid) or not len(dataset.test):
        raise DataError(
            f"{dataset.name}: {len(dataset.user_ids)} users are too few for a stable 8:1:1 split "
            "(no validation or test user)"
        )


def build_nightly_dataset(
    cfg: NightlyConfig, events: pd.DataFrame | None
) -> tuple[SequenceDataset, int]:
    """Tonight's dataset (base + events) and the number of base interactions read (for the
    report)."""
    frame = read_interactions(cfg.data)
    base_count = len(frame)
    if events is not None and len(events):
        frame = pd.concat([frame, events[["user", "item", "time"]]], ignore_index=True)
    dataset = preprocess(cfg.data, frame)
    if cfg.split == "stable":
        stable_split(dataset, cfg.data.split_seed)
    dataset.extra["split"] = cfg.split
    return dataset, base_count


def data_key(dataset: SequenceDataset, cfg: NightlyConfig) -> dict[str, Any]:
    """What identifies a training input: if it equals the current bundle's, retraining is moot."""
    return {
        "data_fingerprint": dataset.fingerprint,
        "split": cfg.split,
        "train_settings": json.loads(json.dumps(asdict(cfg.train))),
    }


# --- decision -------------------------------------------------------------------------------------


def decide(
    new: dict[str, float],
    current: dict[str, float] | None,
    metric: str,
    tolerance: float,
) -> tuple[bool, str]:
    """(publish?, why) for the new model's and the current bundle's metrics on the same users."""
    if current is None:
        return True, "no usable published bundle: publishing the first one"
    new_value, old_value = new[metric], current[metric]
    delta = new_value - old_value
    if new_value >= old_value - tolerance:
        return True, (
            f"new {metric} {new_value:.4f} vs current {old_value:.4f} (delta {delta:+.4f}) is "
            f"within the tolerance {tolerance:.4f}"
        )
    return False, (
        f"new {metric} {new_value:.4f} is worse than current {old_value:.4f} by {-delta:.4f}, "
        f"more than the tolerance {tolerance:.4f}: keeping the current bundle"
    )


# --- the run --------------------------------------------------------------------------------------


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


def _redis_client(url: str) -> Any:
    import redis

    # Generous timeouts: a nightly job may wait on a busy Redis, it must not hang forever.
    return redis.Redis.from_url(
        url, decode_responses=True, socket_timeout=30, socket_connect_timeout=10
    )


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def run_nightly(cfg: NightlyConfig) -> dict[str, Any]:
    """One nightly run; returns the report (also written to state_dir/reports/)."""
    return _run(cfg, bootstrap=False)


def run_bootstrap(cfg: NightlyConfig) -> dict[str, Any]:
    """Train and publish the first bundle on the base data, only if none is published yet.

    Idempotent: with a `current` bundle present it does nothing. It never reads or advances the
    event stream, so the first nightly run still sees every event.
    """
    root = Path(cfg.bundle_root)
    existing = current_version(root)
    if existing is not None:
        return {
            "kind": "bootstrap",
            "decision": "exists",
            "reason": f"{root / 'current'} already points at {existing}; nothing to do",
            "current_version": existing,
        }
    return _run(cfg, bootstrap=True)


def _run(cfg: NightlyConfig, bootstrap: bool) -> dict[str, Any]:
    if cfg.redis_url is None and not bootstrap:
        raise NightlyError("the nightly job needs a Redis URL (events and the lock live there)")
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    client = _redis_client(cfg.redis_url) if cfg.redis_url else None
    lock = RedisLock(client, cfg.lock_key, cfg.lock_ttl_s) if client is not None else None
    if lock is not None:
        try:
            lock.acquire()  # LockHeld goes to the caller: refused runs write no report
        except BaseException:
            client.close()
            raise
    report: dict[str, Any] = {
        "kind": "bootstrap" if bootstrap else "nightly",
        "run_id": f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}",
        "started_at": _now(),
        "status": "running",
        "bundle_root": str(cfg.bundle_root),
        "state_dir": str(cfg.state_dir),
    }
    timer = _Timer()
    try:
        _run_locked(cfg, bootstrap, client, lock, report, timer)
        report["status"] = "ok"
    except BaseException as exc:
        # A normal failure (not SIGKILL) still leaves a report saying where it stopped.
        report["status"] = "failed"
        report["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        report["finished_at"] = _now()
        report["durations_s"] = {**timer.durations, "total": timer.total()}
        try:
            report["report_path"] = str(write_report(cfg.state_dir, report))
        except OSError as exc:
            log.error("could not write the run report: %s", exc)
        if lock is not None:
            lock.release()
        if client is not None:
            client.close()
    return report


def _run_locked(
    cfg: NightlyConfig,
    bootstrap: bool,
    client: Any,
    lock: RedisLock | None,
    report: dict[str, Any],
    timer: _Timer,
) -> None:
    root = Path(cfg.bundle_root)
    state = Path(cfg.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    previous = current_version(root)
    report["previous_version"] = previous
    if bootstrap and previous is not None:  # published while we waited for the lock
        report.update(decision="exists", reason=f"{previous} was published meanwhile")
        return

    # 1. Events: read (position, end] and persist them before anything else happens.
    end_id = None
    events = None
    if not bootstrap:
        with timer.stage("events"):
            position = read_position(client, cfg)
            last = client.xrevrange(cfg.stream_key, count=1)
            end_id = last[0][0] if last else None
            new_entries = []
            if end_id is not None and _parse_id(end_id) > _parse_id(position):
                new_entries = list(read_stream(client, cfg.stream_key, position, end_id))
            new_frame, malformed = events_frame(new_entries)
            saved = save_events(state, new_frame)
            events, duplicates = load_events(state)
        report["events"] = {
            "position_before": position,
            "stream_end": end_id,
            "read": len(new_entries),
            "malformed": malformed,
            "saved_to": str(saved) if saved else None,
            "accumulated": len(events),
            "duplicates_dropped": duplicates,
        }

    # 2. Data.
    with timer.stage("data"):
        dataset, base_count = build_nightly_dataset(cfg, events)
    report["data"] = {
        **dataset.summary(),
        "split": cfg.split,
        "base_interactions_read": base_count,
        "event_interactions_read": 0 if events is None else len(events),
    }
    key = data_key(dataset, cfg)

    current_manifest = None
    if previous is not None:
        try:
            current_manifest = read_manifest(resolve_current(root))
        except BundleError as exc:
            log.warning("current bundle unreadable: %s", exc)
    if current_manifest is not None:
        with suppress(OSError, ValueError):
            ids = json.loads((resolve_current(root) / "item_ids.json").read_text())
            known = {i for i in ids if i}
            new_items = [i for i in dataset.item_ids[1:] if i not in known]
            report["data"]["new_items"] = {"count": len(new_items), "sample": new_items[:20]}

    # 3. Nothing new since the current bundle: no training, but still consume the events.
    if (
        not cfg.force
        and current_manifest is not None
        and current_manifest.get("nightly", {}).get("key") == key
    ):
        report.update(
            decision="skipped",
            reason=f"data and training settings equal those of the current bundle {previous}; "
            "nothing to retrain (use --force to retrain anyway)",
            current_version=previous,
        )
        _commit_position(cfg, client, lock, end_id, report, timer)
        return

    # 4. Train.
    runs = state / "runs"
    run_dir = runs / report["run_id"]
    report["run_dir"] = str(run_dir)
    with timer.stage("train"):
        result = train(dataset, cfg.train, run_dir, progress=cfg.progress)
    new_metrics = {"valid": result.valid, "test": result.test}
    report["training"] = {
        "best_iteration": result.best_iteration,
        "iterations": result.iterations,
        "seconds": round(result.seconds, 2),
        "settings": asdict(cfg.train),
    }

    # 5. Evaluate the published bundle on the same held-out users.
    current_metrics = None
    with timer.stage("evaluate_current"):
        if previous is not None:
            try:
                bundle = load_bundle(root)
                current_metrics = {
                    split: evaluate_bundle(bundle, dataset, split) for split in ("valid", "test")
                }
            except BundleError as exc:
                report["current_unusable"] = str(exc)
                log.warning("cannot evaluate the current bundle: %s", exc)
    publish, reason = decide(
        new_metrics[cfg.compare_split],
        None if current_metrics is None else current_metrics[cfg.compare_split],
        cfg.compare_metric,
        cfg.tolerance,
    )
    comparison: dict[str, Any] = {
        "metric": cfg.compare_metric,
        "split": cfg.compare_split,
        "tolerance": cfg.tolerance,
        "new": new_metrics[cfg.compare_split][cfg.compare_metric],
    }
    if current_metrics is not None:
        comparison["current"] = current_metrics[cfg.compare_split][cfg.compare_metric]
        comparison["delta"] = comparison["new"] - comparison["current"]
    report["metrics"] = {"new": new_metrics, "current": current_metrics, "comparison": comparison}
    report["reason"] = reason
    log.info("nightly decision: %s (%s)", "publish" if publish else "keep", reason)

    # 6. Publish (the one visible change), prune, tell the service.
    with timer.stage("publish"):
        if publish:
            extra = {
                "nightly": {
                    "key": key,
                    "run_id": report["run_id"],
                    "kind": report["kind"],
                    "events_until": end_id,
                    "accumulated_events": report["data"]["event_interactions_read"],
                    "comparison": comparison,
                }
            }
            if lock is not None:
                lock.check()
            path = export_run(
                run_dir,
                root,
                cfg.index_factory,
                cfg.search_params,
                publish=False,
                extra=extra,
            )
            try:
                if lock is not None:
                    lock.check()
                set_current(root, path.name)
            except BaseException:
                # Never leave an unpublished version behind: it would count toward retention.
                shutil.rmtree(path, ignore_errors=True)
                raise
            report.update(decision="published", published_version=path.name)
            log.info("published %s", path.name)
        else:
            report["decision"] = "rejected"
        report["current_version"] = current_version(root)
        # Best effort: housekeeping that fails must not block consuming the events below.
        try:
            report["pruned"] = prune(root, cfg.retention)
            _prune_runs(runs, cfg.keep_runs)
        except OSError as exc:
            log.warning("pruning failed: %s", exc)
            report["prune_error"] = str(exc)
    if publish and cfg.reload_url:
        report["reload"] = notify_reload(cfg.reload_url, cfg.admin_token)

    _commit_position(cfg, client, lock, end_id, report, timer)


def _commit_position(
    cfg: NightlyConfig,
    client: Any,
    lock: RedisLock | None,
    end_id: str | None,
    report: dict[str, Any],
    timer: _Timer,
) -> None:
    """Advance the saved position to end_id (the very last step), then trim the stream."""
    if client is None or end_id is None:
        return
    if _parse_id(end_id) <= _parse_id(report["events"]["position_before"]):
        return  # nothing new was read: never move the position backwards
    with timer.stage("commit"):
        if lock is not None:
            lock.check()
        client.set(cfg.position_key, end_id)
        report["events"]["position_after"] = end_id
        if cfg.trim_stream:
            # XTRIM MINID drops ids < minid: exactly the consumed (and saved) entries.
            report["events"]["trimmed"] = client.xtrim(
                cfg.stream_key, minid=_next_id(end_id), approximate=False
            )


def notify_reload(url: str, token: str | None) -> dict[str, Any]:
    """POST <url>/admin/reload; failures are reported, not raised (the service also polls)."""
    request = urllib.request.Request(f"{url.rstrip('/')}/admin/reload", method="POST", data=b"")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return {"ok": True, "status": response.status, "body": json.loads(response.read())}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("reload notification to %s failed: %s", url, exc)
        return {"ok": False, "error": str(exc)}


def _prune_runs(runs: Path, keep: int) -> None:
    if not runs.is_dir():
        return
    dirs = sorted(p for p in runs.iterdir() if p.is_dir())
    for old in dirs[: max(0, len(dirs) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def write_report(state_dir: Path, report: dict[str, Any]) -> Path:
    directory = Path(state_dir) / "reports"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{report['run_id']}.json"
    write_json_atomic(path, report)
    return path
