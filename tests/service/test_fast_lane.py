"""The fast lane (service/recommend.py) answers plain POST /recommend requests itself and hands
the rest to the FastAPI route; either way a client must get exactly what the route answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from remi_core.redis_keys import history_key
from service.app import create_app
from service.settings import Settings
from tests.helpers import RedisServer, tiny_item_ids

KEY = "k-123"
ITEMS = [i for i in tiny_item_ids() if i is not None]
HISTORY = ITEMS[3:9]
JSON = {"content-type": "application/json"}


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


KEYED = {**JSON, "x-api-key": KEY}
# POST /recommend as (label, headers, raw body, which way the lane sends it: True answers it
# itself, False hands it to the route, None never sees it).
# fmt: off
CASES: list[tuple[str, dict[str, str], bytes, bool | None]] = [
    ("plain", JSON, body({"history": HISTORY}), True),
    ("n", JSON, body({"history": HISTORY, "n": 3}), True),
    ("n at REMI_MAX_N", JSON, body({"history": HISTORY, "n": 40}), True),
    ("keep history", JSON, body({"history": HISTORY, "n": 7, "exclude_history": False}), True),
    ("explain", JSON, body({"history": HISTORY[:2], "explain": True}), True),
    ("diversity", JSON, body({"history": HISTORY, "diversity": 0.2}), True),
    ("unknown ids", JSON, body({"history": ["nope", *HISTORY, "x"]}), True),
    ("only unknown ids", JSON, body({"history": ["nope"]}), True),
    ("empty history", JSON, body({"history": [], "n": 5}), True),
    ("charset", {"content-type": "application/json; charset=utf-8"},
     body({"history": HISTORY}), True),
    ("+json", {"content-type": "application/vnd.x+json"}, body({"history": HISTORY}), True),
    ("identity", {**JSON, "content-encoding": " Identity"}, body({"history": HISTORY}), True),
    ("stored history", KEYED, body({"user_id": "alice", "n": 4}), True),
    ("unknown user", KEYED, body({"user_id": "nobody"}), True),
    ("key holds no list", KEYED, body({"user_id": "not-a-list"}), True),  # 409 from Redis
    # Handed on to the route:
    ("stored history, no key", JSON, body({"user_id": "alice"}), False),
    ("wrong key", {**JSON, "x-api-key": "k-12"}, body({"user_id": "alice"}), False),
    ("empty key", {**JSON, "x-api-key": ""}, body({"user_id": "alice"}), False),
    ("n over REMI_MAX_N", JSON, body({"history": HISTORY, "n": 41}), False),
    ("n = 0", JSON, body({"history": HISTORY, "n": 0}), False),
    ("n as a string", JSON, body({"history": HISTORY, "n": "5"}), False),
    ("n past 64 bits", JSON, b'{"history": ["a"], "n": 123456789012345678901234567890}', False),
    ("history too long", JSON, body({"history": ITEMS[:13]}), False),
    ("both", JSON, body({"history": HISTORY, "user_id": "alice"}), False),
    ("neither", JSON, body({"n": 3}), False),
    ("extra field", JSON, body({"history": HISTORY, "x": 1}), False),
    ("NaN", JSON, b'{"history": ["a"], "diversity": NaN}', False),
    ("1e400", JSON, b'{"history": ["a"], "diversity": 1e400}', False),
    # json.loads reads these and the route answers 200; orjson does not, so the lane hands on.
    ("lone surrogate", JSON, b'{"history": ["\\ud800", "a"]}', False),
    ("BOM", JSON, b'\xef\xbb\xbf{"history": ["a"]}', False),
    ("not JSON", JSON, b'{"history": [', False),
    ("not UTF-8", JSON, b'{"history": ["\xff"]}', False),
    ("a list", JSON, body([{"history": HISTORY}]), False),
    ("empty body", JSON, b"", False),
    ("text/plain", {"content-type": "text/plain"}, body({"history": HISTORY}), False),
    ("no content type", {}, body({"history": HISTORY}), False),
    # The route's 415, though this body (labelled compressed, sent plain) reads as JSON.
    ("gzip", {**JSON, "content-encoding": "gzip"}, body({"history": HISTORY}), False),
    ("over the inline size", JSON, body({"history": HISTORY, "pad": "x" * 70_000}), False),
    ("over REMI_MAX_BODY_BYTES", JSON, body({"history": ["y" * 200] * 600}), None),  # 413
]
# fmt: on
# Requests the lane never sees: another method or path.
OTHER_ROUTES = [
    ("GET", "/recommend", {}, b""),
    ("POST", "/recommend/", JSON, body({"history": HISTORY})),
    ("POST", "/recommend/batch", JSON, body({"requests": [{"history": HISTORY}]})),
]


def settings(root: Path, redis_url: str, fast_lane: bool) -> Settings:
    return Settings(
        bundle_root=root,
        redis_url=redis_url,
        reload_interval_s=0,
        api_keys=KEY,
        max_n=40,
        max_history=12,
        max_body_bytes=100_000,
        fast_lane=fast_lane,
    )


@pytest.fixture
def clients(tiny_bundle_root: Path, redis_server: RedisServer) -> Iterator[dict[bool, TestClient]]:
    """Two apps on the same bundle and Redis: {fast lane on: client, off: client}."""
    with (
        TestClient(create_app(settings(tiny_bundle_root, redis_server.url, True))) as fast,
        TestClient(create_app(settings(tiny_bundle_root, redis_server.url, False))) as route,
    ):
        events = [{"user_id": "alice", "item_id": item, "timestamp": 1_700_000_000 + i}
                  for i, item in enumerate(ITEMS[20:30])]  # fmt: skip
        assert fast.post("/events", json={"events": events}, headers={"x-api-key": KEY}).is_success
        redis_server.client().set(history_key("not-a-list"), "x")
        yield {True: fast, False: route}


def answer(client: TestClient, method: str, path: str, headers: dict, raw: bytes) -> tuple:
    r = client.request(method, path, headers=headers, content=raw, follow_redirects=False)
    return r.status_code, r.headers.get("content-type"), r.headers.get("retry-after"), r.content


def lane_counts(client: TestClient) -> dict[str, float]:
    counts = {"answered": 0.0, "handed_on": 0.0}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("remi_fast_lane_requests_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            counts[outcome] = float(line.rsplit(" ", 1)[1])
    return counts


def request_counts(client: TestClient) -> list[str]:
    lines = client.get("/metrics").text.splitlines()
    return sorted(
        line for line in lines if line.startswith('remi_http_requests_total{endpoint="/rec')
    )


def test_the_lane_answers_exactly_as_the_route(clients: dict[bool, TestClient]) -> None:
    fast, route = clients[True], clients[False]
    statuses = set()
    for label, headers, raw, way in CASES:
        before = lane_counts(fast)
        got = answer(fast, "POST", "/recommend", headers, raw)
        assert got == answer(route, "POST", "/recommend", headers, raw), label
        statuses.add(got[0])
        expected = dict(before)
        if way is not None:
            expected["answered" if way else "handed_on"] += 1
        assert lane_counts(fast) == expected, label
    assert {200, 401, 409, 413, 422} <= statuses  # the cases reach every kind of answer
    for method, path, headers, raw in OTHER_ROUTES:
        before = lane_counts(fast)
        assert answer(fast, method, path, headers, raw) == answer(route, method, path, headers, raw)
        assert lane_counts(fast) == before, path
    # Requests the lane answered are counted under the route's template, as the route's are.
    assert request_counts(fast) == request_counts(route)


def test_redis_down_gives_the_routes_503(
    clients: dict[bool, TestClient], redis_server: RedisServer
) -> None:
    redis_server.stop()
    got, expected = (answer(clients[way], "POST", "/recommend", KEYED, body({"user_id": "alice"}))
                     for way in (True, False))  # fmt: skip
    assert got == expected
    assert got[0] == 503 and got[2] == "1"
    assert lane_counts(clients[True])["answered"] == 1
    for client in clients.values():  # counted by the same handler either way
        assert "remi_redis_errors_total 1.0" in client.get("/metrics").text


def test_a_stopped_batcher_gives_the_routes_503(clients: dict[bool, TestClient]) -> None:
    answers = []
    for client in clients.values():
        client.portal.call(client.app.state.batcher.aclose)
        answers.append(answer(client, "POST", "/recommend", JSON, body({"history": HISTORY})))
    assert answers[0] == answers[1]
    assert answers[0][0] == 503 and answers[0][2] == "1"
    assert b"not running" in answers[0][3]


def test_the_lane_serves_under_a_root_path(
    tiny_bundle_root: Path, redis_server: RedisServer
) -> None:
    app = create_app(settings(tiny_bundle_root, redis_server.url, True))
    with TestClient(app, root_path="/api") as client:
        r = client.post("/api/recommend", json={"history": HISTORY, "n": 3})
        assert r.status_code == 200 and len(r.json()["items"]) == 3
        assert lane_counts(client)["answered"] == 1
