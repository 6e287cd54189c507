"""Hot reload: swaps under load without a failed request, rejects corrupt bundles."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import remi_core.bundle
import service.registry
from remi_core.bundle import current_version, resolve_current, set_current
from service.app import create_app
from service.recommender import load_model, recommend_batch
from service.settings import Settings
from tests.helpers import dead_redis_url, write_tiny_bundle

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HISTORY = ["books-0001", "books-0017", "books-0099", "books-0150"]


def make_client(root: Path, **overrides: object) -> TestClient:
    values: dict[str, object] = {
        "bundle_root": root,
        "redis_url": dead_redis_url(),
        "admin_token": TOKEN,
        "reload_interval_s": 0,
    }
    settings = Settings(**{**values, **overrides})
    return TestClient(create_app(settings))


@pytest.fixture
def client(tiny_bundle_root: Path) -> Iterator[TestClient]:
    with make_client(tiny_bundle_root) as client:
        yield client


def expected_items(version_dir: Path, n: int = 10) -> list[dict]:
    [result] = recommend_batch(load_model(version_dir), [HISTORY], n=n)
    return [{"item_id": i.item_id, "score": i.score, "interest": i.interest} for i in result.items]


def test_hot_reload_under_concurrent_requests(client: TestClient, tiny_bundle_root: Path) -> None:
    old_dir = resolve_current(tiny_bundle_root)
    old_version = client.get("/v1/model").json()["version"]
    new_dir = write_tiny_bundle(tiny_bundle_root, seed=1, publish=False)
    # Each version has its own answer; a response mixing models would match neither.
    expected = {old_version: expected_items(old_dir), new_dir.name: expected_items(new_dir)}
    assert expected[old_version] != expected[new_dir.name]

    stop = threading.Event()
    failures: list[str] = []
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def hammer(worker: int) -> None:
        while not stop.is_set():
            try:
                if worker % 2:
                    r = client.post("/recommend", json={"history": HISTORY, "n": 10})
                    bodies = [r.json()] if r.status_code == 200 else []
                else:
                    r = client.post(
                        "/recommend/batch",
                        json={"requests": [{"history": HISTORY, "n": 10}] * 3},
                    )
                    bodies = r.json()["results"] if r.status_code == 200 else []
                if r.status_code != 200:
                    raise AssertionError(f"{r.status_code}: {r.text}")
                for body in bodies:
                    if body["items"] != expected[body["model_version"]]:
                        raise AssertionError(f"inconsistent answer from {body['model_version']}")
                with lock:
                    seen.update(b["model_version"] for b in bodies)
            except Exception as exc:  # collected, so one failure does not hide the others
                with lock:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        set_current(tiny_bundle_root, new_dir.name)
        r = client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "reloaded": True,
            "version": new_dir.name,
            "previous": old_version,
            "current_target": new_dir.name,
        }
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert seen[old_version] > 0 and seen[new_dir.name] > 0
    assert client.get("/v1/model").json()["version"] == new_dir.name
    metrics = client.get("/metrics").text
    assert f'remi_model_info{{version="{new_dir.name}"}} 1.0' in metrics
    assert old_version not in metrics
    assert 'remi_model_reloads_total{result="success"} 1.0' in metrics
    # Nothing changed since: a second reload is a no-op.
    assert client.post("/admin/reload", headers=AUTH).json()["reloaded"] is False


@pytest.mark.parametrize("inline_ms", [0.0, 15.0])
def test_a_replaced_model_is_freed(tiny_bundle_root: Path, inline_ms: float) -> None:
    # A worker holds two models only while a reload runs: once the new one serves, nothing
    # keeps the old one (its table and index) alive, whether its batches ran in a compute
    # thread or on the event loop (REMI_BATCH_INLINE_MS, one compute thread).
    with make_client(tiny_bundle_root, batch_inline_ms=inline_ms, compute_threads=1) as client:
        old = weakref.ref(client.app.state.registry.model)
        for _ in range(3):
            assert client.post("/recommend", json={"history": HISTORY, "n": 10}).status_code == 200
        new_dir = write_tiny_bundle(tiny_bundle_root, seed=1, publish=False)
        set_current(tiny_bundle_root, new_dir.name)
        assert client.post("/admin/reload", headers=AUTH).json()["reloaded"] is True
        gc.collect()
        assert old() is None
        r = client.post("/recommend", json={"history": HISTORY, "n": 10})
        assert r.json()["model_version"] == new_dir.name


def test_a_rejected_bundle_is_freed(
    tiny_bundle_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bundle that fails late (every file read, the encoder built) and then a good reload:
    # the rejected model was left in a reference cycle with its error's traceback, which the
    # good reload's gc.freeze() made permanent (160 MB per rejected 200k-item bundle).
    built: list[weakref.ref] = []
    build = remi_core.bundle.build_encoder

    def tracked(cfg):
        encoder = build(cfg)
        built.append(weakref.ref(encoder))
        return encoder

    monkeypatch.setattr(remi_core.bundle, "build_encoder", tracked)
    with make_client(tiny_bundle_root) as client:
        bad = write_tiny_bundle(tiny_bundle_root, seed=4, publish=False)
        table = bad / "item_embeddings.npy"
        np.save(table, np.load(table) + 1.0)  # the encoder's table and the retrieval one differ
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["files"]["item_embeddings"]["sha256"] = remi_core.bundle.sha256_of(table)
        (bad / "manifest.json").write_text(json.dumps(manifest))
        set_current(tiny_bundle_root, bad.name)
        assert client.post("/admin/reload", headers=AUTH).status_code == 409
        good = write_tiny_bundle(tiny_bundle_root, seed=1)
        assert client.post("/admin/reload", headers=AUTH).json()["version"] == good.name
        gc.collect()
        serving = client.app.state.registry.model.encoder
        assert len(built) == 3  # start-up, rejected, good
        assert [ref for ref in built if ref() not in (None, serving)] == []


def test_a_current_naming_a_missing_version_is_reported_as_rejected(
    client: TestClient, tiny_bundle_root: Path
) -> None:
    old_version = current_version(tiny_bundle_root)
    gone = write_tiny_bundle(tiny_bundle_root, seed=3, publish=False)
    set_current(tiny_bundle_root, gone.name)
    shutil.rmtree(gone)
    r = client.post("/admin/reload", headers=AUTH)
    assert r.status_code == 409
    detail = r.json()["detail"]
    assert detail.startswith(f"bundle {gone.name} rejected, still serving {old_version}")
    assert client.get("/readyz").json()["reload"]["rejected_target"] == gone.name


def test_a_current_naming_a_non_utf8_name_is_reported(
    client: TestClient, tiny_bundle_root: Path
) -> None:
    # Python holds the name's undecodable byte as a lone surrogate, which no UTF-8 encoder
    # takes: /readyz answered 500, and a readiness probe took a serving worker out.
    link = os.fsencode(tiny_bundle_root / "current.tmp")
    os.symlink(b"v\xff", link)
    os.replace(link, os.fsencode(tiny_bundle_root / "current"))
    r = client.post("/admin/reload", headers=AUTH)
    assert r.status_code == 409 and "v\\xff" in r.json()["detail"]
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["reload"]["rejected_target"] == "v\\xff"


def test_a_manifest_naming_another_version_is_rejected(
    client: TestClient, tiny_bundle_root: Path
) -> None:
    # /v1/model, /readyz and the metrics report the manifest's version: a copy of another
    # version's manifest (or none at all) would misreport what serves, or answer 500.
    old_version = current_version(tiny_bundle_root)
    for version in (old_version, 7, None):
        bad = write_tiny_bundle(tiny_bundle_root, seed=4, publish=False)
        manifest = json.loads((bad / "manifest.json").read_text())
        (bad / "manifest.json").write_text(json.dumps({**manifest, "version": version}))
        set_current(tiny_bundle_root, bad.name)
        r = client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 409, r.text
        assert f"version {version!r} is not its directory's name" in r.json()["detail"]
        assert client.get("/v1/model").json()["version"] == old_version


def test_a_reload_with_no_current_says_so(client: TestClient, tiny_bundle_root: Path) -> None:
    old_version = current_version(tiny_bundle_root)
    (tiny_bundle_root / "current").unlink()
    r = client.post("/admin/reload", headers=AUTH)
    assert r.status_code == 409
    detail = r.json()["detail"]
    assert detail.startswith(f"nothing to load, still serving {old_version}: no published bundle")


def test_corrupt_bundle_is_rejected_and_old_model_keeps_serving(
    client: TestClient, tiny_bundle_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old_version = current_version(tiny_bundle_root)
    before = client.post("/recommend", json={"history": HISTORY}).json()

    bad = write_tiny_bundle(tiny_bundle_root, seed=2, publish=False)
    index = bad / "index.faiss"
    index.write_bytes(index.read_bytes()[:-64])  # truncated copy, as from a failed transfer
    set_current(tiny_bundle_root, bad.name)

    r = client.post("/admin/reload", headers=AUTH)
    assert r.status_code == 409
    detail = r.json()["detail"]
    assert f"bundle {bad.name} rejected, still serving {old_version}" in detail
    assert "checksum mismatch" in detail and "index" in detail
    assert any("rejected" in rec.getMessage() for rec in caplog.records)

    assert client.post("/recommend", json={"history": HISTORY}).json() == before
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["model_version"] == old_version
    assert ready["reload"]["ok"] is False
    assert ready["reload"]["rejected_target"] == bad.name
    assert "checksum mismatch" in ready["reload"]["error"]
    metrics = client.get("/metrics").text
    assert "remi_model_reload_failing 1.0" in metrics
    assert 'remi_model_reloads_total{result="failure"} 1.0' in metrics

    # Publishing a good bundle afterwards clears the error.
    good = write_tiny_bundle(tiny_bundle_root, seed=3)
    assert client.post("/admin/reload", headers=AUTH).json()["version"] == good.name
    ready = client.get("/readyz").json()
    assert ready["model_version"] == good.name
    assert ready["reload"]["ok"] is True and ready["reload"]["error"] is None


def test_inconsistent_bundle_is_rejected(client: TestClient, tiny_bundle_root: Path) -> None:
    # Checksums match (written by write_bundle) but the manifest lies about the architecture.
    old_version = current_version(tiny_bundle_root)
    bad = write_tiny_bundle(tiny_bundle_root, seed=4, publish=False)
    manifest = bad / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"num_interests": 4', '"num_interests": 5'))
    set_current(tiny_bundle_root, bad.name)
    r = client.post("/admin/reload", headers=AUTH, params={})
    assert r.status_code == 409
    assert "attn_out" in r.json()["detail"] or "size mismatch" in r.json()["detail"]
    assert client.get("/v1/model").json()["version"] == old_version


def test_a_graph_index_that_finds_nothing_is_rejected(tmp_path: Path) -> None:
    # An HNSW index of NaN vectors finds nothing; the search's exact fallback for users a graph
    # leaves short answered the test query from the table anyway, so the bundle loaded.
    import faiss

    from remi_core.bundle import BundleError

    version = write_tiny_bundle(tmp_path, index_factory="HNSW16", search_params="efSearch=16")
    embeddings = np.load(version / "item_embeddings.npy")
    index = faiss.index_factory(embeddings.shape[1], "HNSW16", faiss.METRIC_INNER_PRODUCT)
    index.add(np.full_like(embeddings[1:], np.nan))
    faiss.write_index(index, str(version / "index.faiss"))
    with pytest.raises(BundleError, match="the index finds nothing for an item's own vector"):
        load_model(version, verify=False)


def test_a_graph_bundle_compiles_its_exact_fallback_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first user a graph leaves short would otherwise pay TorchScript's compilation
    # (about 130 ms, then 40 ms for its optimisation, at 100k items) on a live request.
    import remi_core.retrieval as retrieval

    monkeypatch.setattr(retrieval, "_COMPILED", {})
    version = write_tiny_bundle(tmp_path, index_factory="HNSW16", search_params="efSearch=16")
    assert load_model(version, verify=False).search_backend == "faiss"
    assert retrieval._exact_search in retrieval._COMPILED


def test_periodic_check_picks_up_a_new_bundle(tiny_bundle_root: Path) -> None:
    with make_client(tiny_bundle_root, reload_interval_s=0.05) as client:
        old = client.get("/v1/model").json()["version"]
        new = write_tiny_bundle(tiny_bundle_root, seed=5).name
        deadline = time.monotonic() + 10
        while client.get("/v1/model").json()["version"] == old:
            assert time.monotonic() < deadline, "the new bundle was never picked up"
            time.sleep(0.05)
        assert client.get("/v1/model").json()["version"] == new
        body = client.post("/recommend", json={"history": HISTORY}).json()
        assert body["model_version"] == new

        # A corrupt bundle is tried once, logged, and then left alone until it changes.
        bad = write_tiny_bundle(tiny_bundle_root, seed=6, publish=False)
        (bad / "popularity.json").write_text("[1, 2, 3]")
        set_current(tiny_bundle_root, bad.name)
        deadline = time.monotonic() + 10
        while client.get("/readyz").json()["reload"]["ok"]:
            assert time.monotonic() < deadline, "the corrupt bundle was never noticed"
            time.sleep(0.05)
        time.sleep(0.3)  # several more polls
        assert 'remi_model_reloads_total{result="failure"} 1.0' in client.get("/metrics").text
        assert client.get("/v1/model").json()["version"] == new


def test_admin_needs_the_token(client: TestClient, tiny_bundle_root: Path) -> None:
    assert client.post("/admin/reload").status_code == 401
    wrong = client.post("/admin/reload", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == 'Bearer realm="remi-admin"'  # RFC 9110
    assert "admin token" in wrong.json()["detail"]
    basic = client.post("/admin/reload", headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401
    spaced = client.post("/admin/reload", headers={"Authorization": f"bearer   {TOKEN}"})
    assert spaced.status_code == 200, spaced.text  # the scheme is case-insensitive, 1*SP
    trailing = client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN} \t"})
    assert trailing.status_code == 200, trailing.text  # blanks after a value are not in it
    with make_client(tiny_bundle_root, admin_token=None) as no_admin:
        r = no_admin.post("/admin/reload", headers=AUTH)
        assert r.status_code == 403
        assert "REMI_ADMIN_TOKEN" in r.json()["detail"]


def test_malformed_manifest_is_rejected(client: TestClient, tiny_bundle_root: Path) -> None:
    # The manifest itself has no checksum: a broken model section must still be a clean reject.
    old_version = current_version(tiny_bundle_root)
    bad = write_tiny_bundle(tiny_bundle_root, seed=7, publish=False)
    manifest = bad / "manifest.json"
    manifest.write_text(
        manifest.read_text().replace('"num_items": 201,\n    "model_type"', '"model_type"', 1)
    )
    set_current(tiny_bundle_root, bad.name)
    r = client.post("/admin/reload", headers=AUTH)
    assert r.status_code == 409, r.text
    assert "TypeError" in r.json()["detail"] and "num_items" in r.json()["detail"]
    assert client.get("/v1/model").json()["version"] == old_version


def test_pointing_current_back_at_the_served_bundle_clears_the_failure(
    client: TestClient, tiny_bundle_root: Path
) -> None:
    served = current_version(tiny_bundle_root)
    bad = write_tiny_bundle(tiny_bundle_root, seed=8, publish=False)
    (bad / "popularity.json").write_text("[1, 2, 3]")
    set_current(tiny_bundle_root, bad.name)
    assert client.post("/admin/reload", headers=AUTH).status_code == 409
    assert client.get("/readyz").json()["reload"]["ok"] is False
    assert "remi_model_reload_failing 1.0" in client.get("/metrics").text

    set_current(tiny_bundle_root, served)  # roll back: nothing newer to load
    r = client.post("/admin/reload", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["reloaded"] is False and r.json()["version"] == served
    reload = client.get("/readyz").json()["reload"]
    assert reload["ok"] is True
    assert reload["error"] is None and reload["rejected_target"] is None
    metrics = client.get("/metrics").text
    assert "remi_model_reload_failing 0.0" in metrics
    assert 'remi_model_reloads_total{result="failure"} 1.0' in metrics  # history is kept


def test_a_worker_starting_while_current_is_rejected_serves_the_last_good_version(
    tiny_bundle_root: Path,
) -> None:
    # A worker restarted (OOM, a crash) while `current` names a rejected bundle: failing to
    # start would make uvicorn's supervisor stop every worker. It serves what the others do.
    good = current_version(tiny_bundle_root)
    bad = write_tiny_bundle(tiny_bundle_root, seed=2)  # published, then damaged in place
    index = bad / "index.faiss"
    index.write_bytes(index.read_bytes()[:-64])
    with make_client(tiny_bundle_root) as client:
        assert client.get("/v1/model").json()["version"] == good
        ready = client.get("/readyz").json()
        assert ready["ready"] is True and ready["model_version"] == good
        assert ready["reload"]["rejected_target"] == bad.name
        assert "checksum mismatch" in ready["reload"]["error"]
        metrics = client.get("/metrics").text
        assert "remi_model_reload_failing 1.0" in metrics
        # Counted as the failed reload it stands for (the metric's HELP says so).
        assert 'remi_model_reloads_total{result="failure"} 1.0' in metrics
        assert "a `current` rejected at start-up" in metrics
        assert client.post("/recommend", json={"history": HISTORY}).status_code == 200
    # With no version that can serve, start-up still fails.
    (tiny_bundle_root / good / "index.faiss").write_bytes(b"")
    with pytest.raises(Exception, match="no usable bundle"), make_client(tiny_bundle_root):
        pass


def test_a_version_that_arrives_after_current_named_it_is_loaded(tiny_bundle_root: Path) -> None:
    # An operator's `cp -r`: `current` switched before the copy is complete (or before the
    # directory exists). The failed check is retried when the version's files change.
    source = write_tiny_bundle(tiny_bundle_root, seed=7, publish=False)
    staged = tiny_bundle_root.parent / "staged"
    source.rename(staged)
    with make_client(tiny_bundle_root, reload_interval_s=0.05) as client:
        old = client.get("/v1/model").json()["version"]

        def wait_for(check, what: str) -> None:
            deadline = time.monotonic() + 10
            while not check():
                assert time.monotonic() < deadline, what
                time.sleep(0.05)

        link = tiny_bundle_root / ".link"
        link.symlink_to(source.name)  # dangling for now (set_current would refuse it)
        link.replace(tiny_bundle_root / "current")
        wait_for(lambda: not client.get("/readyz").json()["reload"]["ok"], "never noticed")
        source.mkdir()
        for name in ("manifest.json", "encoder.safetensors"):  # half of the copy
            (source / name).write_bytes((staged / name).read_bytes())
        wait_for(
            lambda: "item_embeddings" in (client.get("/readyz").json()["reload"]["error"] or ""),
            "the half-copied version was not tried again",
        )
        assert client.get("/v1/model").json()["version"] == old
        for path in staged.iterdir():  # the rest of the copy
            if not (source / path.name).exists():
                (source / path.name).write_bytes(path.read_bytes())
        wait_for(
            lambda: client.get("/v1/model").json()["version"] == source.name,
            "the completed version was never loaded",
        )
        assert client.get("/readyz").json()["reload"]["ok"] is True


@pytest.mark.parametrize("damaged", ["index.faiss", "manifest.json"])
def test_the_start_up_fallback_is_never_a_version_rolled_back_from(
    tiny_bundle_root: Path, damaged: str
):
    # v1 serves; v2 is published, found bad and rolled back from; then v1 is damaged (without
    # its manifest, v1's age is unknown: every version counted as older). A worker starting
    # now must not bring v2 back: only versions older than `current` may stand in.
    good = current_version(tiny_bundle_root)
    rolled_back_from = write_tiny_bundle(tiny_bundle_root, seed=2).name
    set_current(tiny_bundle_root, good)
    if damaged == "manifest.json":
        (tiny_bundle_root / good / damaged).unlink()
    else:
        (tiny_bundle_root / good / damaged).write_bytes(b"")
    with pytest.raises(Exception, match="no usable bundle"), make_client(tiny_bundle_root):
        pass
    assert rolled_back_from in remi_core.bundle.list_versions(tiny_bundle_root)
    # Nor without published.log: nothing then says which versions were meant to serve.
    older = write_tiny_bundle(tiny_bundle_root.parent / "other", seed=3, version="v0").parent
    write_tiny_bundle(older, seed=4, version="v1")
    (older / "published.log").unlink()
    (older / "v1" / "index.faiss").write_bytes(b"")
    with pytest.raises(Exception, match="no usable bundle"), make_client(older):
        pass


def test_a_version_rolled_back_from_stays_out_after_later_publishes(tiny_bundle_root: Path):
    # v1 serves; v2 is rolled back from; v3 is published. With v3 and v1 damaged, a starting
    # worker served v2, which is older than v3 but was rolled back from.
    good = current_version(tiny_bundle_root)
    rolled_back_from = write_tiny_bundle(tiny_bundle_root, seed=2).name
    set_current(tiny_bundle_root, good)
    latest = write_tiny_bundle(tiny_bundle_root, seed=3).name
    for version in (latest, good):
        (tiny_bundle_root / version / "index.faiss").write_bytes(b"")
    with pytest.raises(Exception, match="no usable bundle"), make_client(tiny_bundle_root):
        pass
    # Published again after the rollback, it may stand in once more.
    set_current(tiny_bundle_root, rolled_back_from)
    set_current(tiny_bundle_root, latest)
    with make_client(tiny_bundle_root) as client:
        assert client.get("/v1/model").json()["version"] == rolled_back_from


def test_a_damaged_manifest_tells_no_age_to_the_start_up_fallback(tiny_bundle_root: Path):
    # An unparseable manifest sorted as the oldest version: with v2's damaged, v1 (published
    # before it) counted as rolled back from; with current's own damaged, nothing counted as
    # older. Either way no worker could start, though v1 could serve.
    v1 = current_version(tiny_bundle_root)
    v2 = write_tiny_bundle(tiny_bundle_root, seed=2).name
    v3 = write_tiny_bundle(tiny_bundle_root, seed=3).name
    (tiny_bundle_root / v2 / "manifest.json").write_text('{"version": "' + v2)  # cut short
    (tiny_bundle_root / v3 / "index.faiss").write_bytes(b"")
    with make_client(tiny_bundle_root) as client:
        assert client.get("/v1/model").json()["version"] == v1
    (tiny_bundle_root / v3 / "manifest.json").write_text("{")
    with make_client(tiny_bundle_root) as client:
        assert client.get("/v1/model").json()["version"] == v1


def test_a_rejected_bundle_is_tried_again_on_a_growing_interval(
    tiny_bundle_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A load may fail for a passing reason (memory short after an OOM kill, a network
    # filesystem) with the files unchanged: the poller tries again, less often each time.
    monkeypatch.setattr(service.registry, "RETRY_FIRST_S", 0.2)
    with make_client(tiny_bundle_root, reload_interval_s=0.02) as client:
        # Damaged before it is published: the poller must never see it whole.
        bad = write_tiny_bundle(tiny_bundle_root, seed=6, publish=False)
        (bad / "popularity.json").write_text("[1, 2, 3]")
        set_current(tiny_bundle_root, bad.name)

        def failures() -> float:
            found = re.search(r'remi_model_reloads_total\{result="failure"\} (\S+)',
                              client.get("/metrics").text)  # fmt: skip
            return float(found.group(1)) if found else 0.0

        deadline = time.monotonic() + 10
        while failures() < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(1.7)  # tries at about 0.2, 0.6 and 1.4 s after the first
        assert 3 <= failures() <= 5
        assert client.get("/readyz").json()["reload"]["rejected_target"] == bad.name
