"""Steps 6 and 7 of the nightly job (see job.py): compare with the published bundle, publish."""

from __future__ import annotations

import json
import logging
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from remi_core.bundle import (
    Bundle,
    BundleError,
    BundleUnreadable,
    created_at,
    current_version,
    load_bundle,
    prune,
    publish_or_discard,
    published_log,
    published_versions,
    rolled_back_from,
    set_current,
    verify_files,
)
from training.data import SequenceDataset
from training.evaluate import evaluate_bundle, evaluate_model, make_eval_set
from training.export import ExportConfig, export_run
from training.nightly.config import NightlyConfig
from training.trainer import load_encoder

if TYPE_CHECKING:
    from training.nightly.job import NightlyRun, Published

log = logging.getLogger(__name__)

COMPARE_SPLIT = "test"  # held-out users never used for early stopping


@dataclass(frozen=True)
class Comparison:
    """Step 6: tonight's metrics beside the published bundle's, on the same users, and the call."""

    publish: bool
    reason: str
    new: dict[str, dict[str, float]]  # split -> metrics of tonight's model
    current: dict[str, dict[str, float]] | None  # the same for the published bundle, if usable
    summary: dict[str, Any]  # metric, split, tolerance, new, current, delta
    current_unusable: str | None = None  # why the published bundle could not be evaluated
    recent: dict[str, dict[str, float]] = field(default_factory=dict)  # version -> test metrics

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.current_unusable is not None:
            out["current_unusable"] = self.current_unusable
        out["metrics"] = {
            "new": self.new,
            "current": self.current,
            "recent_versions": self.recent,
            "comparison": self.summary,
        }
        return out


@dataclass(frozen=True)
class Outcome:
    """How the run ended: the decision, why, and what `current` is afterwards."""

    decision: str  # exists, skipped, published or rejected
    reason: str
    current_version: str | None
    details: dict[str, Any] = field(default_factory=dict)  # published_version, pruned, reload


def decide(
    new: dict[str, float],
    current: dict[str, float] | None,
    metric: str,
    tolerance: float,
    baseline: tuple[str, dict[str, float]] | None = None,
) -> tuple[bool, str]:
    """(publish?, why) for the new model's metrics against the current bundle's and, when given,
    the best recent version's (`baseline`: (version, metrics)), all on the same users."""
    if current is None and baseline is None:
        return True, "no usable published bundle: publishing the first one"
    others = [("current", current)] if current is not None else []
    if baseline is not None:
        others.append((f"the best recent version {baseline[0]}", baseline[1]))
    new_value = new[metric]
    for name, metrics in others:
        old_value = metrics[metric]
        if not new_value >= old_value - tolerance:  # so that a NaN anywhere keeps the current
            return False, (
                f"new {metric} {new_value:.4f} is worse than {name} {old_value:.4f} by "
                f"{old_value - new_value:.4f}, more than the tolerance {tolerance:.4f}: keeping "
                "the current bundle"
            )
    against = " and ".join(
        f"{name} {m[metric]:.4f} (delta {new_value - m[metric]:+.4f})" for name, m in others
    )
    return (
        True,
        f"new {metric} {new_value:.4f} vs {against} is within the tolerance {tolerance:.4f}",
    )


def compare(
    cfg: NightlyConfig,
    new: dict[str, dict[str, float]],
    published_version: str | None,
    dataset: SequenceDataset,
    established: tuple[Path, frozenset[str]] | None = None,
) -> Comparison:
    """Step 6: evaluate the published bundle, and the newest other versions (the drift guard),
    on tonight's held-out users and decide.

    `established`: (tonight's run directory, the base data's users). The new model must then
    also be within the tolerance of the current bundle on the held-out users of the base data
    alone: users that tonight's events brought (a crawler, a bot, a broken client) can
    outnumber the real ones and dilute a loss on them below the tolerance (12,000 bots clicking
    at random let a model through whose recall on the real users fell from 0.23 to 0.12)."""
    root = Path(cfg.bundle_root)
    current, unusable, bundle = None, None, None
    if published_version is not None:
        try:
            bundle = load_bundle(root)
            current = {s: evaluate_bundle(bundle, dataset, s) for s in ("valid", "test")}
        except BundleUnreadable:
            # Not evidence of damage (permissions, an I/O error): the night fails, as it would
            # with no comparison to make, rather than replace a `current` the API may read fine.
            raise
        except BundleError as exc:
            unusable = str(exc)
            bundle = None
            log.warning("cannot evaluate the current bundle: %s", exc)
    metric = cfg.compare_metric
    recent = _recent_versions(root, published_version, cfg.baseline_versions, dataset)
    best = max(recent.items(), key=lambda kv: kv[1][metric]) if recent else None
    old = None if current is None else current[COMPARE_SPLIT]
    ok, reason = decide(new[COMPARE_SPLIT], old, metric, cfg.tolerance, best)
    summary: dict[str, Any] = {
        "metric": metric,
        "split": COMPARE_SPLIT,
        "tolerance": cfg.tolerance,
        "new": new[COMPARE_SPLIT][metric],
    }
    if old is not None:
        summary["current"] = old[metric]
        summary["delta"] = summary["new"] - summary["current"]
    if best is not None:
        value = best[1][metric]
        summary["baseline"] = {"version": best[0], "value": value, "delta": summary["new"] - value}
    if ok and bundle is not None and established is not None:
        ok, reason = _on_established_users(cfg, dataset, bundle, *established, summary, reason)
    log.info("nightly decision: %s (%s)", "publish" if ok else "keep", reason)
    return Comparison(ok, reason, new, current, summary, unusable, recent)


def _on_established_users(
    cfg: NightlyConfig,
    dataset: SequenceDataset,
    bundle: Bundle,
    run_dir: Path,
    base_users: frozenset[str],
    summary: dict[str, Any],
    reason: str,
) -> tuple[bool, str]:
    """(publish?, why) on the held-out users of the base data alone (see `compare`); as the
    overall decision when tonight's events brought no held-out user, or only such users."""
    test = dataset.users(COMPARE_SPLIT)
    users = np.array([u for u in test if dataset.user_ids[u] in base_users], dtype=np.int64)
    if not 0 < len(users) < len(test):
        return True, reason
    model = load_encoder(run_dir, dataset.num_items)  # tonight's dataset is at hand
    new = evaluate_model(
        model, make_eval_set(dataset, users, model.cfg.seq_len), popularity=dataset.popularity()
    )
    current = evaluate_bundle(bundle, dataset, COMPARE_SPLIT, users)
    metric = cfg.compare_metric
    summary["established_users"] = {
        "users": len(users),
        "new": new[metric],
        "current": current[metric],
        "delta": new[metric] - current[metric],
    }
    ok, why = decide(new, current, metric, cfg.tolerance)
    if not ok:
        return False, f"on the {len(users)} held-out users of the base data, {why}"
    return True, f"{reason}; on the {len(users)} held-out users of the base data, {why}"


def _recent_versions(
    root: Path, current: str | None, count: int, dataset: SequenceDataset
) -> dict[str, dict[str, float]]:
    """Test metrics on tonight's users of the `count` most recently published versions other
    than `current` (a version written but never published vouches for nothing), leaving out
    those an operator rolled back from: the drift guard then held every night to a model
    taken out of service (a rejected night publishes nothing, so it never left the window),
    and a damaged `current` was replaced by it (`publish`)."""
    published = [v for v in published_versions(root) if v != current]
    try:
        named = published_log(root)
    except FileNotFoundError:  # a root from before the log: no rollback on record
        named = []
    taken_out = rolled_back_from(named, {v: created_at(root / v) for v in set(named)})
    versions = [v for v in published if v not in taken_out][-count:] if count else []
    out = {}
    for version in versions:
        try:
            out[version] = evaluate_bundle(load_bundle(root / version), dataset, COMPARE_SPLIT)
        except BundleError as exc:  # a broken old version cannot vouch for anything
            log.warning("drift guard: skipping %s: %s", version, exc)
    return out


def publish(run: NightlyRun) -> Outcome:
    """Step 7: publish if step 6 said so, then prune old versions and run directories."""
    cfg, comparison = run.cfg, run.comparison
    assert comparison is not None
    root = Path(cfg.bundle_root)
    details: dict[str, Any] = {}
    reason = comparison.reason
    if comparison.publish:
        details["published_version"] = _swap_in(run)
    else:
        run.check_lock()  # pruning, and then rejected.json, are changes too: not without it
        if comparison.current_unusable is not None and "baseline" in comparison.summary:
            # `current` cannot load (a restarted API could not serve it) and the drift guard's
            # baseline, the best recent version, beat tonight's model: it replaces `current`,
            # as a rollback would.
            best = comparison.summary["baseline"]["version"]
            damaged = None if run.published is None else run.published.version
            set_current(root, best, expected=damaged)
            details["restored_version"] = best
            reason = f"{reason}; the current bundle {damaged} is damaged, so {best} replaces it"
            log.warning("the current bundle %s is damaged: %s is current again", damaged, best)
    version = current_version(root)
    # A damaged `current` that tonight replaced keeps no place among the versions kept.
    unusable = _damaged(root, run.published) if comparison.current_unusable is not None else ()
    # Best effort: housekeeping that fails must not block consuming the events (step 8).
    try:
        details["pruned"] = prune(root, cfg.retention, unusable=unusable)
        prune_runs(Path(cfg.state_dir) / "runs", cfg.keep_runs)
    except OSError as exc:
        log.warning("pruning failed: %s", exc)
        details["prune_error"] = str(exc)
    decision = "published" if comparison.publish else "rejected"
    return Outcome(decision, reason, version, details)


def _swap_in(run: NightlyRun) -> str:
    """Write tonight's bundle unpublished, then point `current` at it (the one visible change)."""
    assert run.trained is not None and run.data is not None and run.comparison is not None
    root = Path(run.cfg.bundle_root)
    extra = {
        "nightly": {
            "key": run.data.key,
            "run_id": run.run_id,
            "kind": run.kind,
            "events_until": None if run.events is None else run.events.stream_end,
            "accumulated_events": run.data.event_interactions,
            "comparison": run.comparison.summary,
        }
    }
    run.check_lock()
    cfg = run.cfg
    export = ExportConfig(
        cfg.index_factory, cfg.search_params, cfg.recall_target, cfg.categories, cfg.category_col
    )
    path = export_run(run.trained.run_dir, root, export, publish=False, extra=extra)
    # Only over the version tonight's model was compared against: an operator's rollback
    # meanwhile stands, and the run fails (its events are read again the next night).
    expected = None if run.published is None else run.published.version
    publish_or_discard(root, path.name, run.check_lock, expected)
    log.info("published %s", path.name)
    return path.name


def _damaged(root: Path, published: Published | None) -> tuple[str, ...]:
    """The published version, if its files fail their checksums: it could not load for other
    reasons too (memory, too many open files), and an intact one must keep its place."""
    if published is not None and published.manifest is not None:
        try:
            verify_files(root / published.version, published.manifest)
        except BundleError:
            return (published.version,)
        except OSError:  # unreadable now is not proof of damage
            pass
    return ()


def notify_reload(url: str, token: str | None) -> dict[str, Any]:
    """POST <url>/admin/reload; failures are reported, not raised (the service also polls)."""
    try:
        request = urllib.request.Request(f"{url.rstrip('/')}/admin/reload", method="POST", data=b"")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return {"ok": True, "status": response.status, "body": json.loads(response.read())}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        # http.client quotes a header value it refuses (escaped): never the token, in the log
        # or the report.
        error = str(exc)
        for shown in {token, repr(token.encode())[2:-1]} if token else ():
            error = error.replace(shown, "***")
        log.warning("reload notification to %s failed: %s", url, error)
        return {"ok": False, "error": error}


def prune_runs(runs: Path, keep: int) -> None:
    """Delete all but the newest `keep` run directories (run ids sort by time)."""
    if not runs.is_dir():
        return
    dirs = sorted(p for p in runs.iterdir() if p.is_dir())
    for old in dirs[: max(0, len(dirs) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
