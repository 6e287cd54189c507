"""Settings of the nightly and bootstrap jobs, and the errors they raise."""

from __future__ import annotations

import math
import urllib.parse
from dataclasses import dataclass, field, fields
from pathlib import Path

from remi_core.index import check_index_settings
from remi_core.redis_keys import EVENTS_STREAM, redis_url_problem
from remi_core.threads import MAX_THREADS
from training.config import TrainConfig
from training.data import DataConfig
from training.evaluate import CUTOFFS
from training.export import ExportConfig


class NightlyError(RuntimeError):
    """The nightly job cannot run as configured (bad settings, no data, ...)."""


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
    """Redis key holding the last stream id this job consumed (and, at
    `<position_key>:entries-added`, how many entries the stream had ever received up to it)."""
    lock_key: str = "remi:nightly:lock"
    """Redis key of the lock that refuses overlapping runs."""
    lock_ttl_s: float = 300.0
    """Lock expiry in seconds; a heartbeat extends it every ttl/3 while the run is alive."""
    tolerance: float = 0.01
    """Publish when new >= current - tolerance on compare_metric (absolute), on test users."""
    compare_metric: str = "recall@50"
    """Metric of the publish decision."""
    baseline_versions: int = 4
    """Also compare with the best of this many most recently published versions besides
    `current`, on the same users, so losses within the tolerance cannot add up night after
    night; 0: `current` only."""
    retention: int = 5
    """Keep this many most recently published versions (a rollback counts as a publish; plus
    `current`, whatever its age; a damaged one the run replaced does not count)."""
    keep_runs: int = 2
    """Training run directories kept under state_dir/runs (at least 1: tonight's)."""
    index_factory: str | None = ExportConfig.index_factory
    """Faiss index factory of published bundles (default: the `export:` section's)."""
    search_params: str | None = ExportConfig.search_params
    """Faiss search parameters of published bundles (default: the `export:` section's)."""
    recall_target: float = ExportConfig.recall_target
    """Recall an approximate index is tuned to (default: the `export:` section's)."""
    categories: str = ExportConfig.categories
    """Item-category file shipped in published bundles (see `export --categories`); keep it up
    to date with new items, which get no category otherwise. Empty: bundles without categories."""
    category_col: str = ExportConfig.category_col
    """Category column of a CSV --categories file."""
    reload_url: str | None = None
    """Service base URL (http:// or https://); after publishing, POST <url>/admin/reload (best
    effort; the service polls too)."""
    admin_token: str | None = None
    """Bearer token for the reload call."""
    force: bool = False
    """Retrain even when the data and settings equal those of the current bundle."""
    progress: bool = False
    """Show the training progress bar."""
    nice: int = 10
    """Added to the job's nice value by `remi-train nightly` and `bootstrap` (0-19): beside the
    API on one host, the API's threads then get the CPU first (API p99 beside an unbudgeted
    nightly run 13.3 -> 7.9 ms on 2 cores); on idle cores it changes nothing."""
    torch_threads: int | None = None
    """Threads for torch and faiss in this job, fixed (as `--threads`: the load follower is off);
    None keeps the process's thread set-up (`--threads`, else REMI_THREADS, else the CPUs its
    affinity and CPU quota allow, following the load)."""

    def __post_init__(self) -> None:
        # As the service reads REMI_ADMIN_TOKEN: blanks around it (a secret file's newline) are
        # no part of it, and a header cannot carry it with them (the request failed, quoting
        # the token in the log and the report).
        # Blank index settings are unset, as in the export: section (ExportConfig).
        for name in ("admin_token", "reload_url", "index_factory", "search_params"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, value.strip() or None)
        if self.admin_token is not None and not all(" " <= c <= "~" for c in self.admin_token):
            raise NightlyError("admin_token must be printable ASCII, as the service's")
        if self.reload_url is not None and not _http_url(self.reload_url):
            # urllib refused it after the bundle was published: a failed report, and the
            # stream not moved on past the events the published model had learnt.
            raise NightlyError(
                f"reload_url must be an http:// or https:// URL with a host (and a port from 1 "
                f"to 65535, if any), not {self.reload_url!r}"
            )
        if self.retention < 1:
            raise NightlyError("retention must be at least 1")
        if self.keep_runs < 1:  # 0 deleted tonight's run, the dataset the docs point at too
            raise NightlyError(f"keep_runs must be at least 1, not {self.keep_runs}")
        if not (math.isfinite(self.lock_ttl_s) and self.lock_ttl_s > 0):
            raise NightlyError(f"lock_ttl_s must be a positive number, not {self.lock_ttl_s}")
        if self.baseline_versions < 0:
            raise NightlyError("baseline_versions must not be negative")
        # NaN would pass `new >= current - tolerance`'s negation: every model published.
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise NightlyError(f"tolerance must be a finite number >= 0, not {self.tolerance}")
        if not 0 <= self.nice <= 19:
            raise NightlyError(f"nice must be between 0 and 19, not {self.nice}")
        if self.torch_threads is not None and not 1 <= self.torch_threads <= MAX_THREADS:
            raise NightlyError(
                f"torch_threads must be from 1 to {MAX_THREADS}, not {self.torch_threads}"
            )
        if self.redis_url is not None and (problem := redis_url_problem(self.redis_url)):
            raise NightlyError(f"redis_url: {problem}")
        try:  # fail before training, as below
            check_index_settings(
                self.train.dim, self.index_factory, self.search_params, self.recall_target
            )
        except ValueError as exc:
            raise NightlyError(str(exc)) from None
        if self.categories and not Path(self.categories).is_file():  # fail before training
            raise NightlyError(f"categories: {self.categories}: file not found")
        metrics = [f"{m}@{n}" for m in ("recall", "hitrate", "ndcg") for n in CUTOFFS]
        if self.compare_metric not in metrics:
            raise NightlyError(
                f"compare_metric must be one of {metrics}, not {self.compare_metric!r}"
            )

    @classmethod
    def scalar_fields(cls) -> set[str]:
        """Settings that a config file's `nightly:` section may set."""
        return {f.name for f in fields(cls)} - {"data", "train"}


def _http_url(url: str) -> bool:
    """Whether urllib can send a request to url: http(s), a host, a valid port if any."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # ValueError past 65535 or for a name
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return False
    host = parts.hostname or ""
    fine_port = port is None or 1 <= port <= 65535
    return parts.scheme in ("http", "https") and bool(host) and fine_port and " " not in host
