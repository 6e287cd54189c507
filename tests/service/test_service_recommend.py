"""POST /recommend and /recommend/batch against a tiny bundle: results, limits, fallback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from remi_core.bundle import (
    Bundle,
    BundleError,
    load_bundle,
    resolve_current,
    sha256_of,
    write_bundle,
)
from remi_core.models import EncoderConfig, build_encoder
from service import recommender
from service.app import StartupError, create_app
from service.recommender import EXACT_SEARCH, SCREENS, load_model, recommend_batch
from service.settings import Settings
from tests.helpers import (
    TINY,
    assert_brute_force,
    dead_redis_url,
    random_histories,
    same_response,
    tiny_item_ids,
    write_tiny_bundle,
)

ITEMS = [i for i in tiny_item_ids() if i is not None]


@pytest.fixture
def settings(tiny_bundle_root: Path) -> Settings:
    return Settings(
        bundle_root=tiny_bundle_root,
        redis_url=dead_redis_url(),  # these tests must not depend on Redis
        reload_interval_s=0,
        max_history=50,
        max_batch=8,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def bundle(tiny_bundle_root: Path) -> Bundle:
    return load_bundle(tiny_bundle_root)


def test_response_shape(client: TestClient, bundle: Bundle) -> None:
    r = client.post("/recommend", json={"history": ITEMS[:3], "n": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == bundle.version
    assert body["fallback"] is False
    assert body["unknown_ids"] == []
    assert body["known_history_length"] == 3
    assert body["explain"] is None
    assert len(body["items"]) == 7
    for item in body["items"]:
        assert set(item) == {"item_id", "score", "interest"}
        assert item["item_id"] in ITEMS
        assert isinstance(item["score"], float)
        assert 0 <= item["interest"] < bundle.config.num_interests


@pytest.mark.parametrize("exclude_history", [True, False])
def test_scores_are_exact_eq7(client: TestClient, bundle: Bundle, exclude_history: bool) -> None:
    for history in random_histories(12, seed=int(exclude_history)):
        for n in (1, 20):
            body = client.post(
                "/recommend",
                json={"history": history, "n": n, "exclude_history": exclude_history},
            ).json()
            assert_brute_force(bundle, history, body, n, exclude_history)


def test_without_exclusion_history_items_can_come_back(client: TestClient) -> None:
    # A one-item history's single interest is that item's own embedding direction, so the item
    # itself ranks near the top when it is not excluded.
    found = 0
    for item in ITEMS[:20]:
        plain = client.post(
            "/recommend", json={"history": [item], "n": 10, "exclude_history": False}
        ).json()
        excluded = client.post("/recommend", json={"history": [item], "n": 10}).json()
        found += item in {i["item_id"] for i in plain["items"]}
        assert item not in {i["item_id"] for i in excluded["items"]}
    assert found > 0


def test_n_larger_than_catalogue_returns_everything_left(client: TestClient) -> None:
    history = ITEMS[:5]
    body = client.post("/recommend", json={"history": history, "n": 1000}).json()
    returned = [i["item_id"] for i in body["items"]]
    assert len(returned) == len(ITEMS) - 5
    assert set(returned) == set(ITEMS) - set(history)


def test_explain_returns_interests_and_routing(client: TestClient, bundle: Bundle) -> None:
    history = ITEMS[:4]
    body = client.post("/recommend", json={"history": history, "n": 5, "explain": True}).json()
    explain = body["explain"]
    assert explain["window"] == history
    assert len(explain["interests"]) == bundle.config.num_interests
    vectors = np.array([i["vector"] for i in explain["interests"]], dtype=np.float32)
    assert vectors.shape == (bundle.config.num_interests, bundle.config.dim)
    for interest in explain["interests"]:
        assert [w["item_id"] for w in interest["routing"]] == history
        assert sum(w["weight"] for w in interest["routing"]) == pytest.approx(1.0, abs=1e-5)
    # The interest vectors shown are the ones that scored the items.
    for item in body["items"]:
        row = bundle.row_of()[item["item_id"]]
        scores = vectors @ bundle.item_embeddings[row]
        assert item["score"] == pytest.approx(float(scores.max()), rel=1e-5)
        assert item["interest"] == int(scores.argmax())


def test_unknown_ids_are_dropped_listed_and_window_is_last_known(
    client: TestClient, bundle: Bundle
) -> None:
    known = ITEMS[:15]
    history = ["new-1"] + known[:7] + ["new-2", "new-1"] + known[7:] + ["new-3"]
    body = client.post("/recommend", json={"history": history, "n": 10, "explain": True}).json()
    assert body["unknown_ids"] == ["new-1", "new-2", "new-3"]
    assert body["known_history_length"] == 15
    assert body["explain"]["window"] == known[-bundle.config.seq_len :]
    clean = client.post("/recommend", json={"history": known, "n": 10}).json()
    assert body["items"] == clean["items"]
    assert_brute_force(bundle, history, body, 10, exclude_history=True)


@pytest.mark.parametrize("history", [[], ["nope"], ["nope", "", "also-unknown"]])
def test_fallback_to_most_popular(client: TestClient, bundle: Bundle, history: list[str]) -> None:
    body = client.post("/recommend", json={"history": history, "n": 10}).json()
    assert body["fallback"] is True
    expected = [bundle.item_ids[r] for r in bundle.popularity[:10]]
    assert [i["item_id"] for i in body["items"]] == expected
    assert all(i["score"] is None and i["interest"] is None for i in body["items"])
    assert body["unknown_ids"] == list(dict.fromkeys(history))
    # More than the popularity list holds: just the whole list.
    body = client.post("/recommend", json={"history": history, "n": 500}).json()
    assert len(body["items"]) == len(bundle.popularity)


def test_fallback_and_unknown_ids_are_counted(client: TestClient) -> None:
    client.post("/recommend", json={"history": ["x", "y"], "n": 3})
    client.post("/recommend", json={"history": ["z", ITEMS[0]], "n": 3})
    metrics = client.get("/metrics").text
    assert "remi_fallbacks_total 1.0" in metrics
    assert "remi_unknown_item_ids_total 3.0" in metrics


@pytest.mark.parametrize(
    ("payload", "field", "message"),
    [
        ({"history": ["a"], "n": 0}, "n", "greater than or equal to 1"),
        ({"history": ["a"], "n": 1001}, "n", "less than or equal to 1000"),
        ({"history": ["a"], "n": "many"}, "n", "valid integer"),
        ({"history": ITEMS[:51]}, "history", "at most 50 items"),
        ({"history": ["a"], "user_id": "u1"}, None, "Give exactly one of `history` or `user_id`"),
        ({"n": 5}, None, "Give exactly one of `history` or `user_id`"),
        ({"history": [1, 2]}, "history.0", "valid string"),
        ({"history": "books-0001"}, "history", "valid list"),
        ({"history": ["a"], "user_id": None, "colour": "red"}, "colour", "Extra inputs"),
        ({"history": ["a"], "explain": "maybe"}, "explain", "valid boolean"),
        ({"user_id": "  "}, "user_id", "a character that is not whitespace"),
        # Blank in one of OpenAPI's (ECMAScript's) and the server's regex dialects, not both.
        ({"user_id": "\u0085"}, "user_id", "a character that is not whitespace"),
        ({"user_id": "\ufeff\u2028"}, "user_id", "a character that is not whitespace"),
        ({"user_id": "\x1c\x1f"}, "user_id", "a character that is not whitespace"),  # Python's
        ({"history": ["a"], "n": 2.5}, "n", "valid integer"),
        ([], None, "valid dictionary"),
    ],
)
def test_invalid_requests_are_422_with_a_message(
    client: TestClient, payload: object, field: str | None, message: str
) -> None:
    r = client.post("/recommend", json=payload)
    assert r.status_code == 422, r.text
    body = r.json()
    assert message in body["detail"]
    assert any(e["field"] == field for e in body["errors"])
    assert "Traceback" not in r.text


def test_malformed_json_is_422(client: TestClient) -> None:
    r = client.post(
        "/recommend", content=b'{"history": [', headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    assert "JSON" in r.json()["detail"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"requests": []}, "at least 1"),
        ({"requests": [{"history": ["a"]}] * 9}, "at most 8 entries"),
        ({"requests": [{"history": ["a"]}, {"history": ["a"], "n": 5000}]}, "requests.1.n"),
        ({"requests": [{"history": ["a"]}, {"n": 3}]}, "Give exactly one of"),
    ],
)
def test_invalid_batches_are_422(client: TestClient, payload: dict, message: str) -> None:
    r = client.post("/recommend/batch", json=payload)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]


def test_batch_equals_single_requests(client: TestClient) -> None:
    histories = random_histories(6, seed=3)
    entries = [
        {"history": histories[0]},
        {"history": histories[1], "n": 3, "exclude_history": False},
        {"history": histories[2] + ["unknown-x"], "n": 12, "explain": True},
        {"history": ["unknown-y"], "n": 4},
        {"history": histories[3], "n": 1},
        {"history": histories[4][:1], "n": 199, "exclude_history": False},
        {"history": histories[5], "n": 30},
    ]
    batch = client.post("/recommend/batch", json={"requests": entries})
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert len(results) == len(entries)
    for entry, result in zip(entries, results, strict=True):
        single = client.post("/recommend", json=entry).json()
        assert same_response(result, single)


def test_plain_function_without_http(tiny_bundle_root: Path) -> None:
    model = load_model(resolve_current(tiny_bundle_root))
    histories = random_histories(4, seed=5) + [["not-in-catalogue"]]
    together = recommend_batch(model, histories, n=[5, 6, 7, 8, 9], explain=True)
    for history, result, n in zip(histories, together, [5, 6, 7, 8, 9], strict=True):
        [alone] = recommend_batch(model, [history], n=n, explain=True)
        assert same_response(result.items, alone.items)
        assert len(result.items) == n
    assert together[-1].fallback and together[-1].explanation is None
    assert together[0].explanation.interests.shape == (4, 16)


def test_the_encoder_reads_the_retrieval_table(tiny_bundle_root: Path) -> None:
    """One copy of the item table serves the encoder's input and the search, read-only."""
    model = load_model(resolve_current(tiny_bundle_root))
    weights = model.encoder.item_table()
    assert weights.data_ptr() == model.item_table.data_ptr() == model.item_embeddings.ctypes.data
    assert not model.item_embeddings.flags.writeable


def test_every_exact_search_gives_the_same_answers(tiny_bundle_root: Path) -> None:
    """The exact-search kernels differ in speed only; "auto" resolves to one of the three torch
    kernels by timing them on this host."""
    histories = random_histories(6, seed=8)
    answers = {}
    for choice in EXACT_SEARCH:
        model = load_model(resolve_current(tiny_bundle_root), exact_search=choice)
        backend = model.search_backend
        assert backend == choice if choice != "auto" else backend in SCREENS
        screen_type = None if model.screen is None else model.screen.table.dtype
        assert screen_type == SCREENS.get(backend)
        answers[choice] = [r.items for r in recommend_batch(model, histories, n=25)]
    for choice, items in answers.items():
        assert same_response(items, answers["dense"]), choice


def test_auto_leaves_out_a_search_this_host_cannot_run(
    tiny_bundle_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A torch build without an int8 matmul for this CPU (simulated: the int8 screen's search
    raises as aten would) still loads with REMI_EXACT_SEARCH=auto, on another search."""
    real = recommender.exact_merged_topk

    def no_int8(*args, screen=None, **kwargs):
        if screen is not None and screen.table.dtype == torch.int8:
            raise RuntimeError("_int_mm: not implemented for this CPU")
        return real(*args, screen=screen, **kwargs)

    monkeypatch.setattr(recommender, "exact_merged_topk", no_int8)
    model = load_model(resolve_current(tiny_bundle_root), exact_search="auto")
    assert model.search_backend in ("screened", "dense")
    histories = random_histories(3, seed=2)
    monkeypatch.setattr(recommender, "exact_merged_topk", real)
    dense = load_model(resolve_current(tiny_bundle_root), exact_search="dense")
    got, want = (recommend_batch(m, histories, n=10) for m in (model, dense))
    assert all(same_response(a.items, b.items) for a, b in zip(got, want, strict=True))


def test_ops_endpoints(client: TestClient, bundle: Bundle) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    assert ready.json()["model_version"] == bundle.version
    assert ready.json()["redis"]["ok"] is False  # nothing listens at the configured URL
    model = client.get("/v1/model").json()
    assert model["version"] == bundle.version
    assert model["model"]["num_interests"] == 4
    assert model["index_device"] == "cpu"
    assert model["search_backend"] in SCREENS  # REMI_EXACT_SEARCH=auto
    assert model["search_device"] == "cpu"
    # REMI_COMPUTE_THREADS=0: torch's exact search runs a batch per compute thread at once.
    assert model["batches_at_once"] == client.app.state.batcher.workers
    client.post("/recommend", json={"history": ITEMS[:2]})
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert f'remi_model_info{{version="{bundle.version}"}} 1.0' in text
    assert 'remi_http_requests_total{endpoint="/recommend",method="POST",status="200"} 1.0' in text
    assert 'remi_http_request_duration_seconds_count{endpoint="/recommend"} 1.0' in text


def test_start_up_fails_clearly_on_a_corrupt_bundle(tiny_bundle_root: Path) -> None:
    version_dir = resolve_current(tiny_bundle_root)
    embeddings = version_dir / "item_embeddings.npy"
    data = bytearray(embeddings.read_bytes())
    data[-1] ^= 0xFF
    embeddings.write_bytes(bytes(data))
    app = create_app(Settings(bundle_root=tiny_bundle_root, redis_url=dead_redis_url()))
    with pytest.raises(StartupError, match="checksum mismatch .*item_embeddings"), TestClient(app):
        pass


def test_a_stopped_batcher_makes_the_worker_unready(tiny_bundle_root: Path) -> None:
    """Should the batcher's collector end (a bug), requests get a 503 that says so and
    /readyz turns 503, so a load balancer stops sending traffic to this worker."""
    app = create_app(Settings(bundle_root=tiny_bundle_root, redis_url=dead_redis_url()))
    with TestClient(app) as client:
        assert client.post("/recommend", json={"history": ITEMS[:2]}).status_code == 200

        def broken_take() -> list:
            raise RuntimeError("a bug in the collector")

        app.state.batcher._take = broken_take
        answer = client.post("/recommend", json={"history": ITEMS[:2]})
        assert answer.status_code == 503 and "batcher stopped" in answer.text
        assert client.post("/recommend", json={"history": ITEMS[:2]}).status_code == 503
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert ready.json()["model_version"] is not None  # the model is loaded; the batcher is not


def test_start_up_fails_clearly_without_a_bundle(tmp_path: Path, tiny_bundle_root: Path) -> None:
    app = create_app(Settings(bundle_root=tmp_path / "nothing-here", redis_url=dead_redis_url()))
    with pytest.raises(StartupError, match="no published bundle"), TestClient(app):
        pass
    shutil.rmtree(resolve_current(tiny_bundle_root))
    app = create_app(Settings(bundle_root=tiny_bundle_root, redis_url=dead_redis_url()))
    with pytest.raises(StartupError, match="missing version"), TestClient(app):
        pass


def test_bundle_with_repeated_item_ids_is_refused(tmp_path: Path) -> None:
    cfg = EncoderConfig(num_items=6, dim=4, num_interests=2, seq_len=3)
    encoder = build_encoder(cfg)
    ids = [None, "a", "b", "a", "c", "d"]
    with pytest.raises(ValueError, match="unique"):
        write_bundle(
            tmp_path, encoder=encoder, item_ids=ids, popularity=np.arange(1, 6), metadata={}
        )
    # A producer that bypasses write_bundle, with checksums that match: still refused on load.
    path = write_bundle(
        tmp_path,
        encoder=encoder,
        item_ids=[None, "a", "b", "x", "c", "d"],
        popularity=np.arange(1, 6),
        metadata={},
    )
    (path / "item_ids.json").write_text(json.dumps(ids))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["item_ids"]["sha256"] = sha256_of(path / "item_ids.json")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unique"):
        load_model(tmp_path)


def test_malformed_json_detail_names_the_position_not_a_field(client: TestClient) -> None:
    r = client.post(
        "/recommend", content=b'{"history": [', headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    body = r.json()
    assert body["detail"] == "request body is not valid JSON (at character 13): Expecting value"
    assert [e["field"] for e in body["errors"]] == [None]
    assert body["errors"][0]["type"] == "json_invalid"


@pytest.mark.parametrize("model_type", ["youtube-dnn", "gru4rec"])
def test_explain_without_a_routing_matrix_gives_null_routing(
    tmp_path: Path, model_type: str
) -> None:
    root = tmp_path / "bundles"
    write_tiny_bundle(root, seed=0, model_type=model_type)
    settings = Settings(bundle_root=root, redis_url=dead_redis_url(), reload_interval_s=0)
    with TestClient(create_app(settings)) as client:
        r = client.post("/recommend", json={"history": ITEMS[:4], "n": 5, "explain": True})
    assert r.status_code == 200, r.text
    assert "NaN" not in r.text
    explain = r.json()["explain"]
    assert explain["window"] == ITEMS[:4]
    assert [i["interest"] for i in explain["interests"]] == [0]  # one interest, no routing
    assert explain["interests"][0]["routing"] is None
    assert len(explain["interests"][0]["vector"]) == TINY["dim"]


def test_tf32_is_seen_through_either_precision_api(monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU exact search stays off under TF32. set_float32_matmul_precision raised once the
    # per-backend API had been used, failing the bundle's load with a RuntimeError.
    from service.recommender import _tf32_matmuls

    matmul, backends = torch.backends.cuda.matmul, torch.backends
    saved = (matmul.fp32_precision, backends.fp32_precision, backends.mkldnn.matmul.fp32_precision)
    try:
        assert not _tf32_matmuls()
        torch.set_float32_matmul_precision("high")
        assert _tf32_matmuls()
        torch.set_float32_matmul_precision("highest")
        matmul.fp32_precision = "tf32"
        assert _tf32_matmuls()
        matmul.fp32_precision, backends.fp32_precision = "none", "tf32"
        assert _tf32_matmuls()
        matmul.fp32_precision = "ieee"
        assert not _tf32_matmuls()
        monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
        assert _tf32_matmuls()
    finally:  # set_float32_matmul_precision sets mkldnn's too
        matmul.fp32_precision, backends.fp32_precision, backends.mkldnn.matmul.fp32_precision = (
            saved
        )
