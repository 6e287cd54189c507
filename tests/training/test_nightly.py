"""Nightly retraining: event consumption, the publish decision, the lock, crashes and retention.

The fast tests cover the pieces; the integration tests run the whole job on the tiny synthetic
config (configs/nightly-test.yaml, a few seconds per training run) against a real redis-server.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

import remi_core.bundle
import training.nightly.publish as nightly_publish
from remi_core.bundle import (
    BundleError,
    BundleUnreadable,
    current_version,
    list_versions,
    load_bundle,
    read_manifest,
    set_current,
)
from remi_core.redis_keys import EVENTS_STREAM
from tests.helpers import NEW_ITEM, REPO, new_item_events, write_tiny_bundle
from training.cli import LOCK_HELD_EXIT, app
from training.data import DataConfig
from training.nightly import LockHeld, LockLost, NightlyConfig, run_bootstrap, run_nightly
from training.nightly.event_log import events_frame, load_events, save_events
from training.nightly.lock import RedisLock
from training.nightly.publish import decide
from training.trainer import TrainConfig

TEST_CONFIG = REPO / "configs" / "nightly-test.yaml"


def config_from_file(path: Path, **overrides) -> NightlyConfig:
    raw = yaml.safe_load(path.read_text())
    nightly = dict(raw.get("nightly", {}))
    nightly.update(overrides)
    return NightlyConfig(
        data=DataConfig(**raw.get("data", {})),
        train=TrainConfig(**raw.get("train", {})),
        **nightly,
    )


def xadd_events(client, events: list[dict]) -> None:
    for e in events:
        client.xadd(
            EVENTS_STREAM,
            {"user_id": e["user_id"], "item_id": e["item_id"], "timestamp": str(e["timestamp"])},
        )


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # The test config sets torch_threads=1 (fast on shared cores); don't leak it to other tests.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --- fast: pieces ---------------------------------------------------------------------------------


def test_decide_publishes_first_bundle_and_within_tolerance() -> None:
    ok, why = decide({"recall@50": 0.3}, None, "recall@50", 0.01)
    assert ok and "first" in why
    assert decide({"recall@50": 0.295}, {"recall@50": 0.3}, "recall@50", 0.01)[0]
    assert decide({"recall@50": 0.35}, {"recall@50": 0.3}, "recall@50", 0.0)[0]
    ok, why = decide({"recall@50": 0.2}, {"recall@50": 0.3}, "recall@50", 0.01)
    assert not ok and "worse" in why and "0.3000" in why


def test_config_validation() -> None:
    from training.nightly import NightlyError

    with pytest.raises(NightlyError, match="retention"):
        NightlyConfig(retention=0)
    with pytest.raises(NightlyError, match="compare_metric"):
        NightlyConfig(compare_metric="auc")
    with pytest.raises(NightlyError, match="nice must be between 0 and 19, not 20"):
        NightlyConfig(nice=20)
    # Named as the config key; setting up the threads named a --threads flag nobody gave.
    with pytest.raises(NightlyError, match="torch_threads must be from 1 to 1024, not 0"):
        NightlyConfig(torch_threads=0)
    with pytest.raises(NightlyError, match="torch_threads must be from 1 to 1024, not 99999"):
        NightlyConfig(torch_threads=99999)
    # redis-py reads a database part that is no number as database 0: another database's events.
    with pytest.raises(NightlyError, match="redis_url: the database must be a whole number"):
        NightlyConfig(redis_url="redis://redis:6379/O")
    with pytest.raises(NightlyError, match="redis_url: 'ssl' is not an option of a redis://"):
        NightlyConfig(redis_url="redis://redis:6379/0?ssl=true")
    # The service strips REMI_ADMIN_TOKEN; unstripped here, the reload request failed and its
    # error quoted the token into the log and the report.
    assert NightlyConfig(admin_token="s3cret-token\n").admin_token == "s3cret-token"
    with pytest.raises(NightlyError, match="admin_token must be printable ASCII"):
        NightlyConfig(admin_token="s3cret\ntoken")
    # urllib refused it only after publishing: a failed report, the stream not moved on.
    bad = (
        "remi-api",
        "remi-api:8000",
        "ftp://remi-api",
        "http://",
        "http://[::1",
        "http://remi-api:99999",
        "http://remi-api:port",
        "http://remi api/",
        "http://h:0",
    )
    for url in bad:  # fmt: skip
        with pytest.raises(NightlyError, match="reload_url must be an http:// or https://"):
            NightlyConfig(reload_url=url)
    assert (
        NightlyConfig(reload_url="https://remi-api:8000/ ").reload_url == "https://remi-api:8000/"
    )
    assert NightlyConfig(reload_url="http://[::1]:8000").reload_url == "http://[::1]:8000"
    # Blank is unset, as in the export: section (faiss could not parse ' ').
    blank = NightlyConfig(index_factory=" ", search_params="")
    assert (blank.index_factory, blank.search_params) == (None, None)
    # 0 deleted tonight's run directory, the dataset `versions --dataset-dir` reads included.
    with pytest.raises(NightlyError, match="keep_runs must be at least 1, not 0"):
        NightlyConfig(keep_runs=0)


def test_a_bad_value_is_named_as_the_flag_or_the_config_file_that_gave_it(tmp_path: Path) -> None:
    # Every nightly setting error was prefixed "--config:", flags and all.
    config = tmp_path / "c.yaml"
    config.write_text("nightly:\n  tolerance: -2\n")
    root = ["nightly", "--bundle-root", str(tmp_path / "b")]
    for args, says in (
        (["--tolerance", "-1"], "--tolerance: tolerance must be a finite number >= 0, not -1.0"),
        (["--lock-ttl", "0"], "--lock-ttl: lock_ttl_s must be a positive number, not 0.0"),
        (["--reload-url", "remi-api"], "--reload-url: reload_url must be an http:// or https://"),
        (["-c", str(config)], "--config: tolerance must be a finite number >= 0, not -2"),
    ):
        result = CliRunner().invoke(app, [*root, *args])
        assert result.exit_code == 2, result.output
        assert says in result.output and "Traceback" not in result.output


def test_config_file_settings_stand_where_no_flag_is_given(tmp_path: Path) -> None:
    from training.commands.nightly import nightly_config

    config = tmp_path / "c.yaml"
    config.write_text("nightly:\n  progress: true\n  redis_url: redis://events:6379/2\n")
    root = tmp_path / "bundles"
    # progress: true was overridden by the flag's False default.
    assert nightly_config(config, root, None, None, progress=None).progress is True
    assert nightly_config(config, root, None, None, progress=False).progress is False
    # bootstrap (no Redis default) dropped the file's redis_url, and published without the lock.
    assert nightly_config(config, root, None, None, redis_default=None).redis_url == (
        "redis://events:6379/2"
    )
    assert nightly_config(None, root, None, None, redis_default=None).redis_url is None
    assert nightly_config(None, root, None, None).redis_url == NightlyConfig.redis_url


def test_a_failed_reload_notification_never_shows_the_token() -> None:
    from training.nightly.publish import notify_reload

    outcome = notify_reload("http://127.0.0.1:9", "s3cret\ntoken")  # a header it refuses
    assert not outcome["ok"] and "s3cret" not in outcome["error"], outcome
    with pytest.raises(TypeError):  # removed options are not silently accepted
        NightlyConfig(split="official")  # type: ignore[call-arg]


def test_events_saved_atomically_and_deduplicated(tmp_path: Path) -> None:
    entries = [
        ("100-0", {"user_id": "u1", "item_id": "a", "timestamp": "1700000001"}),
        ("100-1", {"user_id": "u1", "item_id": "b", "timestamp": "1700000002.5"}),
        ("101-0", {"user_id": "u2"}),  # malformed: no item, no timestamp
        ("102-0", {"user_id": "u2", "item_id": "a", "timestamp": "nan"}),  # malformed
        ("102-1", {"user_id": "u2", "item_id": "a", "timestamp": "1e300"}),  # out of range
        ("102-2", {"user_id": "u2", "item_id": "a", "timestamp": "1700000000000"}),  # in ms
        ("102-3", {"user_id": "u2", "item_id": "a", "timestamp": "5"}),  # before 2000
        (
            "103-0",
            {"user_id": "u1", "item_id": "a", "timestamp": "1700000001"},
        ),  # client retry duplicate
    ]
    frame, bad = events_frame(entries)
    assert bad == 5 and len(frame) == 3
    first = save_events(tmp_path, frame)
    # A crash after saving: the next run re-reads the same range into the same file name.
    again = save_events(tmp_path, frame)
    assert first == again and first.name == "events-100-0--103-0.csv"
    later, _ = events_frame(
        [("200-0", {"user_id": "u3", "item_id": "c", "timestamp": "1700000009"})]
    )
    save_events(tmp_path, later)
    events, dropped = load_events(tmp_path)
    assert list(events["stream_id"]) == ["100-0", "100-1", "200-0"]
    assert dropped == 1  # the retry duplicate
    assert events["time"].tolist() == [1700000001.0, 1700000002.5, 1700000009.0]
    assert not list((tmp_path / "events").glob(".*tmp"))


def test_a_re_read_range_that_lost_entries_keeps_the_saved_file(tmp_path) -> None:
    # Redis restarted from an older snapshot: a crashed run had saved 100-0..100-3, the stream
    # now holds only 100-0 and 100-1 of them, plus new entries. The new file's name covers the
    # old one's range; deleting the old file by its name lost 100-2 and 100-3 for good.
    def entries(ids: list[str]) -> list[tuple[str, dict[str, str]]]:
        return [
            (i, {"user_id": "u", "item_id": f"item-{i}", "timestamp": str(1_700_000_000 + n)})
            for n, i in enumerate(ids)
        ]

    saved = save_events(tmp_path, events_frame(entries(["100-0", "100-1", "100-2", "100-3"]))[0])
    save_events(tmp_path, events_frame(entries(["100-0", "100-1", "200-0", "200-1"]))[0])
    assert saved.is_file()
    events, dropped = load_events(tmp_path)
    assert sorted(events["stream_id"]) == ["100-0", "100-1", "100-2", "100-3", "200-0", "200-1"]
    assert dropped == 2  # 100-0 and 100-1, in both files
    # A re-read that holds everything the old file did still replaces it.
    save_events(tmp_path, events_frame(entries(["100-0", "100-1", "100-2", "100-3", "200-0"]))[0])
    assert not saved.exists()
    # The same range read again with an entry gone from its middle (XDEL): the file keeps it.
    other = tmp_path / "xdel"
    save_events(other, events_frame(entries(["300-0", "300-1", "300-2"]))[0])
    again = save_events(other, events_frame(entries(["300-0", "300-2"]))[0])
    assert again.name == "events-300-0--300-2.csv"
    assert load_events(other)[0]["stream_id"].tolist() == ["300-0", "300-1", "300-2"]
    # A damaged file of the same range is replaced by the read, as before (not a stop).
    again.write_text("not,a,csv\n")
    save_events(other, events_frame(entries(["300-0", "300-2"]))[0])
    assert load_events(other)[0]["stream_id"].tolist() == ["300-0", "300-2"]


def test_lock_refuses_second_holder_and_releases_only_its_own(redis_server) -> None:
    client = redis_server.client()
    first = RedisLock(client, "remi:nightly:lock", ttl_s=5)
    first.acquire()
    second = RedisLock(client, "remi:nightly:lock", ttl_s=5)
    with pytest.raises(LockHeld, match="refusing to overlap"):
        second.acquire()
    second.release()  # not the holder: must not delete the lock
    assert client.get("remi:nightly:lock") == first.token
    first.check()
    first.release()
    assert client.get("remi:nightly:lock") is None


def test_lock_heartbeat_extends_and_expiry_frees_a_dead_holder(redis_server) -> None:
    client = redis_server.client()
    lock = RedisLock(client, "k", ttl_s=1.0)  # a heartbeat every 1/3 s: 2/3 s of slack
    lock.acquire()
    time.sleep(2.5)  # > 2 TTLs: only the heartbeat keeps it
    lock.check()
    # Simulate the holder dying: stop the heartbeat without releasing.
    lock._stop.set()
    lock._thread.join()
    time.sleep(1.2)
    assert client.get("k") is None
    with pytest.raises(LockLost):
        lock.check()
    successor = RedisLock(client, "k", ttl_s=5)
    successor.acquire()  # a new run gets it
    successor.release()


# --- integration: the whole job -------------------------------------------------------------------


@pytest.fixture(scope="session")
def bootstrapped_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle root bootstrapped once per session with the test config (copy before use)."""
    threads = torch.get_num_threads()
    try:
        base = tmp_path_factory.mktemp("nightly-template")
        cfg = config_from_file(
            TEST_CONFIG, bundle_root=base / "bundles", state_dir=base / "state", redis_url=None
        )
        report = run_bootstrap(cfg)
    finally:
        torch.set_num_threads(threads)
    assert report["decision"] == "published", report
    assert run_bootstrap(cfg)["decision"] == "exists"  # idempotent
    return base / "bundles"


@pytest.fixture
def nightly_env(tmp_path: Path, bootstrapped_root: Path, redis_server):
    """(config, redis client) over a fresh copy of the bootstrapped bundle root."""
    root = tmp_path / "bundles"
    shutil.copytree(bootstrapped_root, root, symlinks=True)
    cfg = config_from_file(
        TEST_CONFIG, bundle_root=root, state_dir=tmp_path / "state", redis_url=redis_server.url
    )
    return cfg, redis_server.client()


@pytest.mark.integration
def test_events_posted_to_the_api_become_recommendable_after_nightly(nightly_env) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    cfg, client = nightly_env
    settings = Settings(bundle_root=cfg.bundle_root, redis_url=cfg.redis_url, reload_interval_s=0.2)
    first = current_version(cfg.bundle_root)
    with TestClient(create_app(settings)) as api:
        before = api.post("/recommend", json={"history": [NEW_ITEM, "books-0001"]}).json()
        assert before["unknown_ids"] == [NEW_ITEM]
        response = api.post("/events", json={"events": new_item_events()})
        assert response.status_code == 200, response.text
        stream_end = client.xrevrange(EVENTS_STREAM, count=1)[0][0]

        report = run_nightly(cfg)

        assert report["status"] == "ok"
        assert report["decision"] == "published", report["reason"]
        assert report["events"]["read"] == 48 and report["events"]["accumulated"] == 48
        assert report["events"]["lost_before_read"] == 0
        assert report["data"]["new_items"] == {"count": 1, "sample": [NEW_ITEM]}
        assert report["metrics"]["current"] is not None  # the old bundle was evaluated too
        assert set(report["durations_s"]) >= {"events", "data", "train", "publish", "total"}
        assert json.loads(Path(report["report_path"]).read_text())["decision"] == "published"
        # Consumed: position advanced to the end captured at the start, stream trimmed.
        assert client.get(cfg.position_key) == stream_end
        assert client.xlen(EVENTS_STREAM) == 0
        assert client.get(cfg.lock_key) is None
        new_version = report["published_version"]
        assert current_version(cfg.bundle_root) == new_version != first

        deadline = time.monotonic() + 20
        while api.get("/v1/model").json()["version"] != new_version:
            assert time.monotonic() < deadline, "the service did not hot-reload the new bundle"
            time.sleep(0.1)
        after = api.post("/recommend", json={"history": [NEW_ITEM, "books-0001"], "n": 1000}).json()
        assert after["model_version"] == new_version and after["unknown_ids"] == []
        stored = api.post(
            "/recommend", json={"user_id": "event-user-0", "n": 1000, "exclude_history": False}
        ).json()
        assert NEW_ITEM in [item["item_id"] for item in stored["items"]]

    # Idempotent: nothing new since the published bundle -> no training, nothing published.
    again = run_nightly(cfg)
    assert again["decision"] == "skipped" and "train" not in again["durations_s"]
    assert current_version(cfg.bundle_root) == new_version
    # Later nights keep the accumulated events even though the stream was trimmed.
    assert again["events"]["accumulated"] == 48
    # Damaged where it is (a disk error, a truncated copy): replaced, though nothing is new.
    index = Path(cfg.bundle_root) / new_version / "index.faiss"
    index.write_bytes(index.read_bytes()[:100])
    repaired = run_nightly(cfg)
    assert repaired["decision"] == "published", repaired["reason"]
    assert "checksum mismatch" in repaired["current_unusable"]
    assert current_version(cfg.bundle_root) == repaired["published_version"] != new_version


@pytest.mark.integration
def test_worse_model_is_not_published_and_retention_keeps_current(nightly_env) -> None:
    cfg, client = nightly_env
    good = current_version(cfg.bundle_root)
    # Two newer versions published, then rolled back to the older good one.
    newer = []
    for seed in (1, 2):
        newer.append(write_tiny_bundle(cfg.bundle_root, seed=seed).name)
        time.sleep(1.1)  # version names sort by the second
    set_current(cfg.bundle_root, good)
    assert len(list_versions(cfg.bundle_root)) == 3
    xadd_events(client, new_item_events(users=2))
    crippled = replace(cfg, train=replace(cfg.train, lr=0.0), retention=2)

    report = run_nightly(crippled)

    assert report["decision"] == "rejected"
    assert "worse" in report["reason"] and "keeping the current bundle" in report["reason"]
    comparison = report["metrics"]["comparison"]
    assert comparison["new"] < comparison["current"] - cfg.tolerance
    assert current_version(cfg.bundle_root) == good
    # retention=2 keeps the two most recently published: the one rolled back to, although
    # the oldest, and the newer one it replaced.
    assert report["pruned"] == [newer[0]]
    assert set(list_versions(cfg.bundle_root)) == {good, newer[1]}
    # The events still count: consumed and kept for the next night.
    assert report["events"]["accumulated"] == 12
    assert client.get(cfg.position_key) == report["events"]["stream_end"]
    # Nothing new the next night: the same model would be rejected again, so it is not trained.
    again = run_nightly(crippled)
    assert again["decision"] == "skipped" and "train" not in again["durations_s"]
    assert f"run {report['run_id']}, whose model was rejected" in again["reason"]
    assert run_nightly(replace(crippled, force=True))["decision"] == "rejected"
    # Under another rule the verdict may differ: a tolerance raised to let the night through.
    relaxed = run_nightly(replace(crippled, tolerance=1.0))
    assert relaxed["decision"] == "published" and "train" in relaxed["durations_s"]
    # Nothing new again, and the same rule: skipped, unless the current bundle is damaged
    # meanwhile: then it is replaced.
    assert run_nightly(replace(crippled, tolerance=1.0))["decision"] == "skipped"
    index = Path(cfg.bundle_root) / relaxed["published_version"] / "index.faiss"
    index.write_bytes(index.read_bytes()[:100])
    repaired = run_nightly(replace(crippled, tolerance=1.0))
    assert repaired["decision"] == "published"
    assert "checksum mismatch" in repaired["current_unusable"]
    # retention=2: the damaged version it replaced takes no place, so the intact `good` stays
    # to roll back to (the damaged one had kept its place, and `good` went).
    assert repaired["pruned"] == [relaxed["published_version"]]
    assert set(list_versions(cfg.bundle_root)) == {good, repaired["published_version"]}


def test_a_current_that_cannot_be_read_now_is_neither_replaced_nor_judged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An I/O error reading `current`'s files made it "unusable": the drift guard's baseline was
    # restored over a `current` the API may read fine. The night fails instead, as it did when
    # the OSError went through.
    from types import SimpleNamespace

    root = tmp_path / "bundles"
    older = write_tiny_bundle(root, seed=0).name
    current = write_tiny_bundle(root, seed=1).name
    sha256_of = remi_core.bundle.sha256_of

    def failing(path: Path) -> str:
        if current in str(path):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return sha256_of(path)

    monkeypatch.setattr(remi_core.bundle, "sha256_of", failing)
    monkeypatch.setattr(
        nightly_publish, "evaluate_bundle", lambda bundle, *args: {"recall@50": 0.3}
    )
    cfg = SimpleNamespace(bundle_root=root, compare_metric="recall@50", tolerance=0.01,
                          baseline_versions=4)  # fmt: skip
    worse = {split: {"recall@50": 0.2} for split in ("valid", "test")}
    with pytest.raises(BundleUnreadable, match="Input/output error"):
        nightly_publish.compare(cfg, worse, current, dataset=None)
    assert current_version(root) == current and set(list_versions(root)) == {older, current}


def test_only_a_version_whose_files_fail_their_checksums_counts_as_damaged(tmp_path: Path) -> None:
    # Any load failure (memory, too many open files) marked `current` unusable, and the prune
    # then deleted the intact version.
    from training.nightly.job import Published
    from training.nightly.publish import _damaged

    root = tmp_path / "bundles"
    version = write_tiny_bundle(root).name
    published = Published(version, read_manifest(root / version), None)
    assert _damaged(root, published) == ()
    index = root / version / "index.faiss"
    index.write_bytes(index.read_bytes()[:100])
    assert _damaged(root, published) == (version,)
    assert _damaged(root, Published(None, None, None)) == ()


@pytest.mark.integration
def test_a_damaged_current_gives_way_to_a_recent_version_that_beat_tonights_model(
    nightly_env,
) -> None:
    # The drift guard rejected tonight's model against an older version, and `current`,
    # damaged, stayed night after night though no restarted API could load it.
    cfg, client = nightly_env
    good = current_version(cfg.bundle_root)
    xadd_events(client, new_item_events())
    first = run_nightly(replace(cfg, tolerance=1.0))
    assert first["decision"] == "published", first["reason"]
    newer = first["published_version"]
    index = Path(cfg.bundle_root) / newer / "index.faiss"
    index.write_bytes(index.read_bytes()[:100])
    crippled = replace(cfg, train=replace(cfg.train, lr=0.0), force=True)

    report = run_nightly(crippled)

    assert report["decision"] == "rejected" and "checksum mismatch" in report["current_unusable"]
    assert report["restored_version"] == good == current_version(cfg.bundle_root)
    assert f"the current bundle {newer} is damaged, so {good} replaces it" in report["reason"]
    assert load_bundle(cfg.bundle_root).version == good


@pytest.mark.integration
def test_a_version_rolled_back_from_is_neither_restored_nor_a_baseline(nightly_env) -> None:
    # The operator rolled back from a newer version; then `current` was damaged and tonight's
    # model lost to that newer version, which the drift guard held up as its baseline and
    # restored: the version taken out of service was served again, and the only one kept.
    cfg, client = nightly_env
    good = current_version(cfg.bundle_root)
    xadd_events(client, new_item_events())
    taken_out = run_nightly(replace(cfg, tolerance=1.0))["published_version"]
    set_current(cfg.bundle_root, good)  # remi-train rollback
    index = Path(cfg.bundle_root) / good / "index.faiss"
    index.write_bytes(index.read_bytes()[:100])
    crippled = replace(cfg, train=replace(cfg.train, lr=0.0), force=True)

    report = run_nightly(crippled)

    assert report["metrics"]["recent_versions"] == {}
    assert "restored_version" not in report and report["decision"] == "published"
    assert current_version(cfg.bundle_root) == report["published_version"] != taken_out


@pytest.mark.integration
def test_a_night_with_new_bundle_or_split_settings_is_not_skipped(nightly_env) -> None:
    # Only the data and the training settings were compared: a new index factory (or split
    # seed, or category file) was never shipped until new events came.
    cfg, client = nightly_env
    xadd_events(client, new_item_events())
    assert run_nightly(cfg)["decision"] == "published"
    assert run_nightly(cfg)["decision"] == "skipped"
    for changed in (replace(cfg, index_factory="HNSW8"),
                    replace(cfg, data=replace(cfg.data, split_seed=99))):  # fmt: skip
        report = run_nightly(changed)
        assert report["decision"] != "skipped" and "train" in report["durations_s"]


@pytest.mark.integration
def test_a_rollback_during_a_run_stands(nightly_env, monkeypatch) -> None:
    # The operator rolled back while the night trained; its model, compared against the
    # version rolled away from, was published over the rollback.
    cfg, client = nightly_env
    good = current_version(cfg.bundle_root)
    older = write_tiny_bundle(cfg.bundle_root, seed=1).name
    set_current(cfg.bundle_root, good)
    xadd_events(client, new_item_events())
    real_compare = nightly_publish.compare

    def compare_then_roll_back(*args, **kwargs):
        comparison = real_compare(*args, **kwargs)
        set_current(cfg.bundle_root, older)  # the operator, meanwhile
        return comparison

    monkeypatch.setattr(nightly_publish, "compare", compare_then_roll_back)
    before = set(list_versions(cfg.bundle_root))
    with pytest.raises(BundleError, match=f"was switched to {older} \\(from {good}\\) meanwhile"):
        run_nightly(replace(cfg, tolerance=1.0))
    assert current_version(cfg.bundle_root) == older
    assert set(list_versions(cfg.bundle_root)) == before  # tonight's version discarded
    assert client.get(cfg.position_key) is None  # its events are read again the next night


def test_a_lock_lost_after_publishing_says_what_was_published(nightly_env) -> None:
    # Another run takes the lock over while this one notifies the API of its publish: the
    # commit must not happen, and the error must not claim that nothing was published.
    import http.server
    import threading

    cfg, client = nightly_env

    class StealTheLock(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            client.set(cfg.lock_key, "another-run")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), StealTheLock)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        xadd_events(client, new_item_events(users=2))
        url = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(LockLost) as lost:
            run_nightly(replace(cfg, reload_url=url, force=True))
    finally:
        server.shutdown()
    published = current_version(cfg.bundle_root)
    assert f"{published} was published, but the stream position was not advanced" in str(lost.value)
    assert client.get(cfg.position_key) is None


def test_a_lock_lost_before_a_rejection_changes_nothing(nightly_env, monkeypatch) -> None:
    # The lock taken over while this run evaluated a worse model: it must neither prune
    # versions nor record the rejection (which would skip the next nights), only stop.
    cfg, client = nightly_env
    write_tiny_bundle(cfg.bundle_root, seed=1, publish=False)  # stale: pruning would remove it
    versions = list_versions(cfg.bundle_root)
    monkeypatch.setattr(remi_core.bundle, "STALE_AFTER_S", 0)
    compare = nightly_publish.compare

    def compare_then_lose_the_lock(*args, **kwargs):
        client.set(cfg.lock_key, "another-run")
        return compare(*args, **kwargs)

    monkeypatch.setattr(nightly_publish, "compare", compare_then_lose_the_lock)
    xadd_events(client, new_item_events(users=2))
    crippled = replace(cfg, train=replace(cfg.train, lr=0.0))
    with pytest.raises(LockLost, match="nothing was published"):
        run_nightly(crippled)
    assert list_versions(cfg.bundle_root) == versions
    assert not (Path(cfg.state_dir) / "rejected.json").exists()


def test_users_that_tonights_events_brought_cannot_dilute_a_loss(nightly_env) -> None:
    # Bots clicking at random outnumber the real held-out users five to one; every model scores
    # about as badly on them, so an untrained model (lr 0) comes within the tolerance overall.
    # On the base data's own held-out users it is far worse, and that must keep it out.
    cfg, client = nightly_env
    items = [i for i in load_bundle(cfg.bundle_root).item_ids if i]
    rng = np.random.default_rng(0)
    start = time.time() - 3600
    pipe = client.pipeline()
    for bot in range(3000):
        for k, item in enumerate(rng.choice(items, size=12)):
            pipe.xadd(EVENTS_STREAM, {"user_id": f"bot{bot}", "item_id": str(item),
                                      "timestamp": str(start + bot * 0.01 + k * 1e-4)})  # fmt: skip
    pipe.execute()
    crippled = replace(cfg, train=replace(cfg.train, lr=0.0), tolerance=0.05)

    report = run_nightly(crippled)

    comparison = report["metrics"]["comparison"]
    overall = comparison["current"] - comparison["new"]  # measured 0.008
    assert overall < crippled.tolerance, "the case must pass the overall gate"
    established = comparison["established_users"]  # measured 0.23 -> 0.12 on 56 users
    assert established["current"] - established["new"] > crippled.tolerance
    assert report["decision"] == "rejected"
    assert "held-out users of the base data" in report["reason"]


@pytest.mark.integration
def test_a_publish_that_fails_after_the_switch_is_reported(nightly_env, monkeypatch) -> None:
    # The switch's last step (syncing the root) fails: the new version is published and
    # serves, and the failed run's report must say so rather than leave it out.
    cfg, client = nightly_env
    xadd_events(client, new_item_events())
    previous = current_version(cfg.bundle_root)
    real_fsync_dir = remi_core.bundle.fsync_dir

    def failing(path: Path) -> None:
        if Path(path) == Path(cfg.bundle_root):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync_dir(path)

    monkeypatch.setattr(remi_core.bundle, "fsync_dir", failing)
    with pytest.raises(OSError, match="Input/output error"):
        run_nightly(cfg)
    [path] = (cfg.state_dir / "reports").glob("*.json")
    report = json.loads(path.read_text())
    assert report["status"] == "failed" and report["previous_version"] == previous
    assert report["current_version"] == current_version(cfg.bundle_root) != previous


@pytest.mark.integration
def test_killed_run_changes_nothing_and_next_run_completes(nightly_env, tmp_path: Path) -> None:
    cfg, client = nightly_env
    xadd_events(client, new_item_events())
    stream_before = client.xrange(EVENTS_STREAM)
    published = current_version(cfg.bundle_root)
    # A run that would train for a long time, so it is surely killed mid-training.
    raw = yaml.safe_load(TEST_CONFIG.read_text())
    raw["train"].update(max_iters=1_000_000, patience=1_000_000)
    slow_config = tmp_path / "slow.yaml"
    slow_config.write_text(yaml.safe_dump(raw))
    command = [
        sys.executable, "-m", "training.cli", "nightly",
        "--config", str(slow_config),
        "--bundle-root", str(cfg.bundle_root),
        "--state-dir", str(cfg.state_dir),
        "--redis-url", cfg.redis_url,
        "--lock-ttl", "2",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMI_")}
    victim = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list((cfg.state_dir / "runs").glob("*/metrics.jsonl")):
            assert victim.poll() is None, victim.stderr.read()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.05)

        # While it trains, an overlapping run is refused with a clear message and exit code.
        overlap = CliRunner().invoke(
            app,
            [
                "nightly",
                "--config",
                str(TEST_CONFIG),
                "--bundle-root",
                str(cfg.bundle_root),
                "--state-dir",
                str(tmp_path / "other-state"),
                "--redis-url",
                cfg.redis_url,
            ],  # fmt: skip
        )
        assert overlap.exit_code == LOCK_HELD_EXIT, overlap.output
        assert "another nightly run holds the lock" in overlap.output
        assert not (tmp_path / "other-state").exists()
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        victim.stderr.close()

    assert current_version(cfg.bundle_root) == published
    assert client.get(cfg.position_key) is None
    assert client.xrange(EVENTS_STREAM) == stream_before
    assert len(list(cfg.state_dir.glob("events/events-*.csv"))) == 1  # saved before training

    # The dead run's lock expires by itself (TTL 2 s); the next run then completes.
    deadline = time.monotonic() + 10
    while client.get(cfg.lock_key) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    report = run_nightly(cfg)
    assert report["status"] == "ok" and report["decision"] in ("published", "rejected")
    assert report["events"]["read"] == 48
    assert report["events"]["accumulated"] == 48  # the re-read range deduplicated
    assert client.get(cfg.position_key) == stream_before[-1][0]
    assert client.xlen(EVENTS_STREAM) == 0
    # The killed run's directory is cleaned up by the run-directory retention in time.
    assert len(list((cfg.state_dir / "runs").iterdir())) <= cfg.keep_runs


@pytest.mark.integration
def test_terminated_run_reports_and_releases_the_lock(nightly_env, tmp_path: Path) -> None:
    cfg, client = nightly_env
    xadd_events(client, new_item_events(users=1))
    raw = yaml.safe_load(TEST_CONFIG.read_text())
    raw["train"].update(max_iters=1_000_000, patience=1_000_000)
    slow_config = tmp_path / "slow.yaml"
    slow_config.write_text(yaml.safe_dump(raw))
    command = [
        sys.executable, "-m", "training.cli", "nightly", "--config", str(slow_config),
        "--bundle-root", str(cfg.bundle_root), "--state-dir", str(cfg.state_dir),
        "--redis-url", cfg.redis_url,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMI_")}
    run = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((cfg.state_dir / "runs").glob("*/metrics.jsonl")):
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)  # docker stop / a Kubernetes deadline
    assert run.wait(30) == 128 + signal.SIGTERM
    assert client.get(cfg.lock_key) is None  # released at once, not after the TTL
    assert client.get(cfg.position_key) is None
    [report] = [json.loads(f.read_text()) for f in (cfg.state_dir / "reports").glob("*.json")]
    assert report["status"] == "failed" and "SystemExit" in report["error"]


def test_overlapping_run_is_refused_by_the_cli(redis_server, tmp_path: Path) -> None:
    client = redis_server.client()
    holder = RedisLock(client, "remi:nightly:lock", ttl_s=30)
    holder.acquire()
    try:
        result = CliRunner().invoke(
            app,
            [
                "nightly",
                "--config",
                str(TEST_CONFIG),
                "--bundle-root",
                str(tmp_path / "b"),
                "--state-dir",
                str(tmp_path / "s"),
                "--redis-url",
                redis_server.url,
            ],  # fmt: skip
        )
    finally:
        holder.release()
    assert result.exit_code == LOCK_HELD_EXIT
    assert "another nightly run holds the lock" in result.output
    assert holder.token.split(":")[0] in result.output  # names the holder
    assert not (tmp_path / "b").exists()


# --- versions and rollback ------------------------------------------------------------------------


def test_versions_and_rollback_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "bundles"
    old = write_tiny_bundle(root, seed=0).name
    time.sleep(1.1)
    new = write_tiny_bundle(root, seed=1).name
    runner = CliRunner()
    listed = runner.invoke(app, ["versions", "--bundle-root", str(root)])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].startswith(f"  {old}") and lines[1].startswith(f"* {new}")

    rolled = runner.invoke(app, ["rollback", old, "--bundle-root", str(root)])
    assert rolled.exit_code == 0, rolled.output
    assert json.loads(rolled.output) == {"bundle_root": str(root), "previous": new, "current": old}
    assert current_version(root) == old
    data = json.loads(runner.invoke(app, ["versions", "--bundle-root", str(root), "--json"]).output)
    assert [v["current"] for v in data["versions"]] == [True, False]

    missing = runner.invoke(app, ["rollback", "v-nope", "--bundle-root", str(root)])
    assert missing.exit_code == 2 and "no bundle version" in missing.output
    assert current_version(root) == old
    # A version the API would refuse: rolled back to, it left nothing a restarted API could
    # start on (the start-up fallback serves only versions older than `current`).
    index = root / new / "index.faiss"
    index.write_bytes(index.read_bytes()[:-64])
    damaged = runner.invoke(app, ["rollback", new + "/", "--bundle-root", str(root)])
    assert damaged.exit_code == 2, damaged.output
    assert f"{new} cannot serve, so `current` stays {old}: checksum mismatch" in damaged.output
    assert current_version(root) == old
    # A hand-edited manifest with fields of the wrong type is listed, not a traceback.
    manifest = json.loads((root / new / "manifest.json").read_text())
    manifest.update(metrics=None, nightly="x", num_items="946")
    (root / new / "manifest.json").write_text(json.dumps(manifest))
    for extra in ([], ["--json"]):
        listed = runner.invoke(app, ["versions", "--bundle-root", str(root), *extra])
        assert listed.exit_code == 0 and "Traceback" not in listed.output, listed.output
    nope = runner.invoke(app, ["versions", "--bundle-root", str(root), "--dataset-dir", "nope"])
    assert nope.exit_code == 2 and "--dataset-dir: nope is not a directory" in nope.output
    # An unreadable manifest (chmod 000, which root, running these tests in CI, reads anyway):
    # marked in its row, where the listing stopped with the PermissionError.
    unreadable = root / new / "manifest.json"
    read_text = Path.read_text

    def denied(path: Path, *args: Any, **kwargs: Any) -> str:
        if path == unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "read_text", denied)
        listed = runner.invoke(app, ["versions", "--bundle-root", str(root), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["version"]: row for row in json.loads(listed.output)["versions"]}
    assert "cannot read" in rows[new]["error"] and "error" not in rows[old]
    # `current` naming a version that is gone: no `*` anywhere said nothing about it.
    (root / "current").unlink()
    os.symlink("v-gone", root / "current")
    listed = runner.invoke(app, ["versions", "--bundle-root", str(root)])
    assert "current -> v-gone: missing" in listed.output.splitlines()[-1], listed.output
    # A copied version in its place (`cp -rL`): listed without a `*` and without a word.
    (root / "current").unlink()
    shutil.copytree(root / old, root / "current")
    listed = runner.invoke(app, ["versions", "--bundle-root", str(root)])
    assert listed.exit_code == 0, listed.output
    assert "current is not a symlink (a copied version?)" in listed.output


def test_bootstrap_does_nothing_when_a_bundle_exists(tmp_path: Path) -> None:
    root = tmp_path / "bundles"
    version = write_tiny_bundle(root).name
    result = CliRunner().invoke(
        app, ["bootstrap", "--config", str(TEST_CONFIG), "--bundle-root", str(root)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["decision"] == "exists"
    assert current_version(root) == version
    set_current(root, version)
    assert read_manifest(root / version)["version"] == version


def test_bootstrap_publishes_when_current_names_a_version_that_is_gone(tmp_path: Path) -> None:
    # It reported "exists" and trained nothing, and the API could not start.
    root = tmp_path / "bundles"
    root.mkdir()
    os.symlink("v-gone", root / "current")
    result = CliRunner().invoke(
        app,
        ["bootstrap", "--config", str(TEST_CONFIG), "--bundle-root", str(root),
         "--state-dir", str(tmp_path / "state")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["decision"] == "published"
    assert (root / current_version(root)).is_dir()


def test_events_frame_matches_service_format() -> None:
    # The service writes whole-second timestamps as "1700000000" and others via repr(float).
    frame, bad = events_frame(
        [
            ("1-0", {"user_id": "u", "item_id": "i", "timestamp": "1700000000"}),
            ("1-1", {"user_id": "u", "item_id": "j", "timestamp": "1700000000.25"}),
        ]
    )
    assert bad == 0
    assert isinstance(frame, pd.DataFrame) and frame["time"].tolist() == [1.7e9, 1.70000000025e9]
