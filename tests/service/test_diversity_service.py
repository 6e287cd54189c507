"""`diversity` in POST /recommend and /recommend/batch: ComiRec's greedy step over the merged
candidates, checked against an independent computation from the bundle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from remi_core.bundle import Bundle, load_bundle
from remi_core.diversity import POOL_MULTIPLE, different_pairs, greedy_diverse
from service.app import create_app
from service.settings import Settings
from tests.helpers import dead_redis_url, encode, same_response, tiny_item_ids, write_tiny_bundle

ITEMS = [i for i in tiny_item_ids() if i is not None]
CATEGORY_NAMES = ["books", "games", "music", "films", "garden"]


def tiny_categories() -> tuple[np.ndarray, list[str]]:
    rows = np.array([-1] + [(r * 7) % 5 for r in range(1, len(ITEMS) + 1)], dtype=np.int32)
    rows[1:6] = -1  # a few items without a category: together they count as one
    return rows, CATEGORY_NAMES


def client_for(root: Path) -> TestClient:
    settings = Settings(bundle_root=root, redis_url=dead_redis_url(), reload_interval_s=0)
    return TestClient(create_app(settings))


@pytest.fixture(params=["bundle categories", "producing interest"])
def served(request, tmp_path: Path) -> Iterator[tuple[TestClient, Bundle]]:
    categories = tiny_categories() if request.param == "bundle categories" else None
    root = tmp_path / "bundles"
    write_tiny_bundle(root, seed=3, categories=categories)
    with client_for(root) as client:
        yield client, load_bundle(root)


def expected_list(bundle: Bundle, history: list[str], n: int, diversity: float) -> list[dict]:
    """Brute force over the whole catalogue, then the greedy rule on the top POOL_MULTIPLE * n."""
    interests, rows = encode(bundle, history)
    per_interest = bundle.item_embeddings @ interests.T  # (N, K)
    best, producing = per_interest.max(axis=1), per_interest.argmax(axis=1)
    eligible = np.ones(len(best), dtype=bool)
    eligible[0] = False
    eligible[rows] = False
    candidates = np.flatnonzero(eligible)
    order = np.lexsort((candidates, -best[candidates]))  # score descending, then row
    pool = candidates[order][: POOL_MULTIPLE * n if diversity > 0 else n]
    cats = bundle.categories[pool] if bundle.categories is not None else producing[pool]
    picked = greedy_diverse(best[pool][None, :], cats[None, :], n, diversity)[0]
    return [
        {"item_id": bundle.item_ids[r], "score": float(best[r]), "interest": int(producing[r])}
        for r in pool[picked[picked >= 0]]
    ]


def category_of(bundle: Bundle, item: dict) -> int:
    if bundle.categories is None:
        return item["interest"]
    return int(bundle.categories[bundle.row_of()[item["item_id"]]])


@pytest.mark.parametrize("diversity", [0.05, 0.3, 10.0])
def test_served_lists_follow_the_greedy_rule(served, diversity):
    client, bundle = served
    rng = np.random.default_rng(0)
    for _ in range(5):
        history = list(rng.choice(ITEMS, size=int(rng.integers(2, 15))))
        body = {"history": history, "n": 8, "diversity": diversity}
        r = client.post("/recommend", json=body)
        assert r.status_code == 200, r.text
        got = r.json()["items"]
        assert same_response(got, expected_list(bundle, history, 8, diversity))


def test_lambda_zero_is_the_plain_response_and_large_lambda_spreads(served):
    client, bundle = served
    history = ITEMS[10:22]
    plain = client.post("/recommend", json={"history": history, "n": 10}).json()
    zero = client.post("/recommend", json={"history": history, "n": 10, "diversity": 0}).json()
    assert zero == plain  # bit for bit: lambda 0 is Eq. 7
    wide = client.post("/recommend", json={"history": history, "n": 10, "diversity": 10}).json()

    def pairs_across(body):
        return different_pairs(np.array([category_of(bundle, item) for item in body["items"]]))

    assert pairs_across(wide) > pairs_across(plain)
    assert len({category_of(bundle, item) for item in wide["items"]}) == (
        6 if bundle.categories is not None else bundle.config.num_interests  # 5 + "none"
    )


def test_batch_entries_match_single_requests(served):
    client, _ = served
    entries = [
        {"history": ITEMS[:6], "n": 5, "diversity": 0.5},
        {"history": ITEMS[40:44], "n": 9},
        {"history": ITEMS[90:100], "n": 3, "diversity": 10},
        {"history": ["unknown-id"], "n": 4, "diversity": 1.0},  # fallback: popularity as is
    ]
    r = client.post("/recommend/batch", json={"requests": entries})
    assert r.status_code == 200, r.text
    for entry, result in zip(entries, r.json()["results"], strict=True):
        alone = client.post("/recommend", json=entry).json()
        assert same_response(result, alone)
    assert r.json()["results"][3]["fallback"] is True


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-0.1, "greater than or equal to 0"),
        (10.5, "less than or equal to 10"),
        ("0.1", "valid number"),
        (True, "valid number"),
    ],
)
def test_bad_diversity_is_a_422_naming_the_field(tmp_path, value, message):
    write_tiny_bundle(tmp_path / "b")
    with client_for(tmp_path / "b") as client:
        r = client.post("/recommend", json={"history": ITEMS[:2], "diversity": value})
        assert r.status_code == 422
        assert r.json()["detail"].startswith("diversity:") and message in r.json()["detail"]
        r = client.post(
            "/recommend/batch", json={"requests": [{"history": ITEMS[:2], "diversity": value}]}
        )
        assert r.status_code == 422 and "diversity" in r.json()["detail"]
