"""POST /events and user_id requests against a real redis-server, including an outage."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from redis.exceptions import BusyLoadingError

from remi_core.redis_keys import EVENTS_STREAM, history_key, history_times_key
from service.app import create_app
from service.redact import redact_url as _redact
from service.settings import Settings
from tests.helpers import RedisServer, same_response


def redis_settings(bundle_root: Path, redis_server: RedisServer, **overrides: Any) -> Settings:
    defaults = {"redis_url": redis_server.url, "redis_timeout_s": 0.5, "history_cap": 5,
                "max_events": 10, "reload_interval_s": 0}  # fmt: skip
    return Settings(bundle_root=bundle_root, **{**defaults, **overrides})


@pytest.fixture
def client(tiny_bundle_root: Path, redis_server: RedisServer) -> Iterator[TestClient]:
    with TestClient(create_app(redis_settings(tiny_bundle_root, redis_server))) as client:
        yield client


def events(user: str, items: list[str], start: float = 1_700_000_000) -> dict:
    return {
        "events": [
            {"user_id": user, "item_id": item, "timestamp": start + i}
            for i, item in enumerate(items)
        ]
    }


def test_events_then_user_request(client: TestClient, redis_server: RedisServer) -> None:
    items = ["books-0003", "books-0010", "brand-new-item", "books-0042"]
    r = client.post("/events", json=events("alice", items))
    assert r.status_code == 200, r.text
    assert r.json() == {"stored": 4}
    r = client.post("/events", json={"events": [{"user_id": "bob", "item_id": "books-0007",
                                                  "timestamp": 1700000100.25}]})  # fmt: skip
    assert r.status_code == 200

    redis = redis_server.client()
    assert redis.lrange(history_key("alice"), 0, -1) == items
    stream = redis.xrange(EVENTS_STREAM)
    assert [fields for _, fields in stream] == [
        {"user_id": "alice", "item_id": item, "timestamp": str(1_700_000_000 + i)}
        for i, item in enumerate(items)
    ] + [{"user_id": "bob", "item_id": "books-0007", "timestamp": "1700000100.25"}]

    by_user = client.post("/recommend", json={"user_id": "alice", "n": 8, "explain": True}).json()
    by_history = client.post("/recommend", json={"history": items, "n": 8, "explain": True}).json()
    assert by_user["user_id"] == "alice"
    assert by_user["unknown_ids"] == ["brand-new-item"]  # accepted as an event, unknown to serve
    assert by_user["known_history_length"] == 3
    assert same_response(
        {k: v for k, v in by_user.items() if k != "user_id"},
        {k: v for k, v in by_history.items() if k != "user_id"},
    )

    batch = client.post(
        "/recommend/batch",
        json={"requests": [{"user_id": "bob"}, {"history": items}, {"user_id": "alice"}]},
    ).json()["results"]
    assert same_response(batch[0], client.post("/recommend", json={"user_id": "bob"}).json())
    alone = client.post("/recommend", json={"user_id": "alice"}).json()
    assert same_response(batch[2]["items"], alone["items"])


def test_history_is_capped_and_stream_keeps_everything(
    client: TestClient, redis_server: RedisServer
) -> None:
    items = [f"books-{i:04d}" for i in range(1, 9)]
    assert client.post("/events", json=events("carol", items[:6])).status_code == 200
    later = events("carol", items[6:], start=1_700_000_006)
    assert client.post("/events", json=later).status_code == 200
    redis = redis_server.client()
    assert redis.lrange(history_key("carol"), 0, -1) == items[-5:]  # history_cap=5
    assert redis.xlen(EVENTS_STREAM) == 8
    body = client.post("/recommend", json={"user_id": "carol", "explain": True}).json()
    assert body["explain"]["window"] == items[-5:]


def test_a_history_keeps_timestamp_order_whatever_order_events_arrive_in(
    client: TestClient, redis_server: RedisServer
) -> None:
    # A client's offline batch arrives after newer events: it was appended after them (served
    # as the most recent items), and the cap then dropped the newest events instead.
    def event(item: str, ts: int) -> dict:
        return {"user_id": "dora", "item_id": item, "timestamp": 1_700_000_000 + ts}

    first = [event("books-0011", 200), event("books-0012", 300)]
    assert client.post("/events", json={"events": first}).status_code == 200
    late = [
        event("books-0002", 150),
        event("books-0001", 100),
        event("books-0005", 250),
        event("books-0013", 300),
    ]
    assert client.post("/events", json={"events": late}).status_code == 200
    redis = redis_server.client()
    # history_cap=5: the oldest by timestamp (books-0001) went; equal timestamps keep arrival
    # order.
    ordered = ["books-0002", "books-0011", "books-0005", "books-0012", "books-0013"]
    assert redis.lrange(history_key("dora"), 0, -1) == ordered
    times = [str(1_700_000_000 + ts) for ts in (150, 200, 250, 300, 300)]
    assert redis.lrange(history_times_key("dora"), 0, -1) == times
    body = client.post("/recommend", json={"user_id": "dora", "explain": True}).json()
    assert body["explain"]["window"] == ordered


def test_a_history_written_before_its_timestamps_is_kept_as_the_oldest(
    client: TestClient, redis_server: RedisServer
) -> None:
    redis = redis_server.client()
    redis.rpush(history_key("emil"), "legacy-1", "legacy-2")  # no timestamps list
    assert client.post("/events", json=events("emil", ["a", "b"])).status_code == 200
    assert redis.lrange(history_key("emil"), 0, -1) == ["legacy-1", "legacy-2", "a", "b"]
    times = ["0", "0", "1700000000", "1700000001"]
    assert redis.lrange(history_times_key("emil"), 0, -1) == times
    # A timestamp another writer left that is no number counts as oldest too (the script
    # failed on it after writing the stream, so every retry added the events again).
    redis.lset(history_times_key("emil"), 3, "2023-11-14")
    later = events("emil", ["c"], start=1_700_000_000.5)
    assert client.post("/events", json=later).status_code == 200
    assert redis.lrange(history_key("emil"), 0, -1) == ["legacy-1", "legacy-2", "a", "b", "c"]
    assert redis.xlen(EVENTS_STREAM) == 3


def test_unknown_user_gets_the_fallback(client: TestClient) -> None:
    body = client.post("/recommend", json={"user_id": "nobody", "n": 5}).json()
    assert body["fallback"] is True
    assert body["known_history_length"] == 0
    assert len(body["items"]) == 5


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"events": []}, "at least 1"),
        ({"events": [{"user_id": "", "item_id": "a", "timestamp": 1e9}]}, "events.0.user_id"),
        ({"events": [{"user_id": "u", "item_id": " ", "timestamp": 1e9}]}, "events.0.item_id"),
        ({"events": [{"user_id": "u", "item_id": "a", "timestamp": "1"}]}, "valid number"),
        ({"events": [{"user_id": "u", "item_id": "a", "timestamp": True}]}, "valid number"),
        ({"events": [{"user_id": "u", "item_id": "a"}]}, "events.0.timestamp: Field required"),
        (
            {"events": [{"user_id": "u", "item_id": "a", "timestamp": 1e9}] * 11},
            "at most 10 events",
        ),
        ({"user_id": "u", "item_id": "a", "timestamp": 1e9}, "events: Field required"),
    ],
)
def test_invalid_events_are_422(
    client: TestClient, redis_server: RedisServer, payload: dict, message: str
) -> None:
    r = client.post("/events", json=payload)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert redis_server.client().xlen(EVENTS_STREAM) == 0  # nothing half-written


def test_redis_outage_then_recovery(client: TestClient, redis_server: RedisServer) -> None:
    assert client.post("/events", json=events("dave", ["books-0001"])).status_code == 200
    assert client.post("/recommend", json={"user_id": "dave"}).status_code == 200

    redis_server.stop()
    start = time.monotonic()
    r = client.post("/recommend", json={"user_id": "dave"})
    assert r.status_code == 503
    assert "Redis" in r.json()["detail"] and "unavailable" in r.json()["detail"]
    assert r.headers["retry-after"] == "1"
    assert time.monotonic() - start < 2.0  # fails fast, no long retry loop
    assert client.post("/events", json=events("dave", ["books-0002"])).status_code == 503
    batch = client.post(
        "/recommend/batch", json={"requests": [{"history": ["books-0001"]}, {"user_id": "dave"}]}
    )
    assert batch.status_code == 503
    # Requests that carry their history do not need Redis.
    r = client.post("/recommend", json={"history": ["books-0001", "books-0002"]})
    assert r.status_code == 200
    assert r.json()["fallback"] is False
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["redis"]["ok"] is False
    assert ready.json()["redis"]["error"]
    assert "remi_redis_errors_total 3.0" in client.get("/metrics").text

    redis_server.start()  # same port, empty (nothing persisted)
    assert client.get("/readyz").json()["redis"] == {"ok": True, "error": None}
    assert client.post("/events", json=events("dave", ["books-0005"])).status_code == 200
    r = client.post("/recommend", json={"user_id": "dave"})
    assert r.status_code == 200
    assert r.json()["known_history_length"] == 1


def test_recovers_without_a_health_check_first(
    client: TestClient, redis_server: RedisServer
) -> None:
    # The first command after a restart meets a stale pooled connection: it must still succeed.
    assert client.post("/events", json=events("erin", ["books-0001"])).status_code == 200
    redis_server.stop()
    redis_server.start()
    assert client.post("/events", json=events("erin", ["books-0002"])).status_code == 200
    r = client.post("/recommend", json={"user_id": "erin"})
    assert r.status_code == 200


def test_frozen_redis_times_out_fast(client: TestClient, redis_server: RedisServer) -> None:
    # A hung Redis (accepts nothing, answers nothing) must cost a timeout, not a stuck request.
    assert client.post("/events", json=events("frank", ["books-0001"])).status_code == 200
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        r = client.post("/recommend", json={"user_id": "frank"})
        assert r.status_code == 503
        assert "TimeoutError: no reply within 0.5 s (REMI_REDIS_TIMEOUT_S)" in r.json()["detail"]
        assert time.monotonic() - start < 3.0  # 0.5 s timeout, one retry
        redis = client.get("/readyz").json()["redis"]  # it said "TimeoutError: "
        assert redis == {
            "ok": False,
            "error": "TimeoutError: no reply within 0.5 s (REMI_REDIS_TIMEOUT_S)",
        }
        assert client.post("/recommend", json={"history": ["books-0001"]}).status_code == 200
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    r = client.post("/recommend", json={"user_id": "frank"})
    assert r.status_code == 200
    assert r.json()["known_history_length"] == 1


def test_undecodable_history_entries_count_as_unknown(
    client: TestClient, redis_server: RedisServer
) -> None:
    # A foreign writer may store bytes that are not UTF-8; they can be no catalogue id.
    raw = Redis.from_url(redis_server.url)  # no decoding: stores the bytes as given
    try:
        raw.rpush(history_key("zed"), b"\xff\xfe", b"books-0003")
    finally:
        raw.close()
    r = client.post("/recommend", json={"user_id": "zed", "n": 5, "explain": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["fallback"] is False
    assert body["known_history_length"] == 1
    assert body["explain"]["window"] == ["books-0003"]
    assert len(body["unknown_ids"]) == 1
    assert "remi_unknown_item_ids_total 1.0" in client.get("/metrics").text


def test_overlong_stored_ids_are_unknown_and_cut(
    client: TestClient, redis_server: RedisServer
) -> None:
    # POST /events refuses ids over 256 characters; a foreign writer may still store them, and
    # echoing them whole made 120 ids of 200 KB a 20 MB response.
    huge, long = "x" * 200_000, "y" * 300
    redis_server.client().rpush(history_key("yan"), huge, "books-0003", long, huge)
    r = client.post("/recommend", json={"user_id": "yan", "n": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["known_history_length"] == 1
    assert sorted(body["unknown_ids"]) == ["x" * 256 + "…", "y" * 256 + "…"]
    assert len(r.content) < 5_000


def test_replies_are_parsed_by_hiredis() -> None:
    # The pure-Python parser took 0.56 s for 256 histories of 1,000 ids, over a 0.5 s budget.
    import redis.utils

    assert redis.utils.HIREDIS_AVAILABLE, "hiredis is missing: pip install -e '.[serve]'"


def test_many_requests_wait_for_a_pooled_connection(
    tiny_bundle_root: Path, redis_server: RedisServer
) -> None:
    """More concurrent user_id requests than connections, while Redis stalls for less than the
    timeout: the surplus waits for a connection instead of failing with 'Too many
    connections' (redis-py's default pool)."""
    import asyncio

    from service.history import HistoryStore

    redis_server.client().rpush(history_key("pat"), "books-0003")

    async def read_during_a_stall() -> list:
        store = HistoryStore(redis_server.url, 2.0, history_cap=5, max_connections=2)
        try:
            await store.ping()
            redis_server.client().execute_command("CLIENT", "PAUSE", 300, "ALL")
            reads = [store.histories(["pat"], 5) for _ in range(20)]
            return await asyncio.gather(*reads, return_exceptions=True)
        finally:
            await store.close()

    assert asyncio.run(read_during_a_stall()) == [[["books-0003"]]] * 20


def test_wrong_type_history_key_is_409_and_nothing_is_written(
    client: TestClient, redis_server: RedisServer
) -> None:
    redis = redis_server.client()
    assert client.post("/events", json=events("amy", ["books-0001"])).status_code == 200
    redis.set(history_key("bob"), "x")  # a foreign writer's string where a list belongs

    both = events("amy", ["books-0002"])["events"] + events("bob", ["books-0003"])["events"]
    r = client.post("/events", json={"events": both})
    assert r.status_code == 409, r.text
    assert "retry-after" not in r.headers  # retrying cannot help
    detail = r.json()["detail"]
    assert "'bob'" in detail and f"'{history_key('bob')}'" in detail and "not a list" in detail
    # Nothing of the batch was written: not amy's event, not the stream entries.
    assert redis.lrange(history_key("amy"), 0, -1) == ["books-0001"]
    assert redis.xlen(EVENTS_STREAM) == 1
    assert redis.get(history_key("bob")) == "x"

    r = client.post("/recommend", json={"user_id": "bob"})
    assert r.status_code == 409, r.text
    assert "retry-after" not in r.headers
    detail = r.json()["detail"]
    assert "'bob'" in detail and f"'{history_key('bob')}'" in detail and "not a list" in detail
    batch = client.post(
        "/recommend/batch", json={"requests": [{"user_id": "amy"}, {"user_id": "bob"}]}
    )
    assert batch.status_code == 409
    assert "remi_redis_errors_total 0.0" in client.get("/metrics").text

    redis.delete(history_key("bob"))  # once the key is fixed, the same batch goes through
    redis.set(history_times_key("bob"), "y")  # ... but for its timestamps' key
    r = client.post("/events", json={"events": both})
    assert r.status_code == 409 and "the history timestamps of user 'bob'" in r.json()["detail"]
    assert redis.xlen(EVENTS_STREAM) == 1
    redis.delete(history_times_key("bob"))
    assert client.post("/events", json={"events": both}).status_code == 200
    assert redis.lrange(history_key("bob"), 0, -1) == ["books-0003"]
    assert redis.xlen(EVENTS_STREAM) == 3


def test_wrong_type_stream_key_is_409_and_nothing_is_written(
    client: TestClient, redis_server: RedisServer
) -> None:
    redis = redis_server.client()
    redis.rpush(EVENTS_STREAM, "not-a-stream")
    r = client.post("/events", json=events("amy", ["books-0001", "books-0002"]))
    assert r.status_code == 409, r.text
    assert f"'{EVENTS_STREAM}'" in r.json()["detail"] and "not a stream" in r.json()["detail"]
    assert redis.exists(history_key("amy")) == 0
    assert redis.lrange(EVENTS_STREAM, 0, -1) == ["not-a-stream"]


def test_a_write_redis_refuses_stores_nothing_and_says_so(
    tiny_bundle_root: Path, redis_server: RedisServer
) -> None:
    # A refusal is an answer: nothing was stored (the 503 said "may or may not have been").
    redis = redis_server.client()
    redis.execute_command("ACL", "SETUSER", "no-scripts", "on", ">pw", "~*", "&*", "+@all",
                          "-evalsha", "-eval")  # fmt: skip
    # Every key the docs named then, but not the request tokens.
    redis.execute_command("ACL", "SETUSER", "no-tokens", "on", ">pw", "~remi:history:*",
                          "~remi:events", "&*", "+@all")  # fmt: skip
    two_users = {"events": events("amy", ["books-0001"])["events"]
                 + events("bob", ["books-0002"])["events"]}  # fmt: skip

    def post(url: str | None = None) -> None:
        settings = redis_settings(tiny_bundle_root, redis_server, redis_url=url or redis_server.url)
        with TestClient(create_app(settings)) as client:
            r = client.post("/events", json=two_users)
        assert r.status_code == 503, r.text
        assert r.json()["detail"].endswith("nothing was stored"), r.text

    # Users that may run the script but not a command it runs after its first write: it wrote
    # the stream (and with SET everything), then failed, and the 503 said nothing was stored.
    for command in ("rpush", "set", "lrange"):
        redis.execute_command("ACL", "SETUSER", f"no-{command}", "on", ">pw", "~*", "&*", "+@all",
                              f"-{command}")  # fmt: skip
    # Redis 6 has no acl_check_cmd: there such a user stores part (docs/serving.md).
    redis7 = int(redis.info("server")["redis_version"].split(".")[0]) >= 7
    later = ("no-rpush", "no-set", "no-lrange") if redis7 else ()
    for user in ("no-scripts", "no-tokens", *later):
        post(redis_server.url.replace("redis://", f"redis://{user}:pw@"))
    redis.execute_command("REPLICAOF", "127.0.0.1", "1")  # read-only, as after a failover
    post()
    redis.execute_command("REPLICAOF", "NO", "ONE")
    # A stream whose ids are used up: the script stops at its first write, the stream's, so no
    # history holds an event the stream lacks (it wrote amy's before, and a retry duplicated it).
    redis.xadd(EVENTS_STREAM, {"x": "1"}, id="18446744073709551615-18446744073709551615")
    post()
    assert redis.exists(history_key("amy"), history_key("bob")) == 0
    assert redis.xlen(EVENTS_STREAM) == 1


def test_events_sent_while_redis_loads_its_dataset_are_refused_not_unknown(
    tiny_bundle_root: Path, redis_server: RedisServer
) -> None:
    # A restarted Redis answers -LOADING until its dataset is in memory: the script never ran,
    # but redis-py makes that a ConnectionError, which read as "may or may not have been stored".
    redis = redis_server.client()
    with redis.pipeline(transaction=False) as pipe:
        for i in range(20_000):
            pipe.set(f"filler:{i}", "x")
        pipe.execute()
    redis.save()
    redis_server.stop()
    # 20,000 keys at 0.2 ms each: about 4 s of loading, seen by clients every 1 KiB read.
    slow = ("--key-load-delay", "200", "--loading-process-events-interval-bytes", "1024")
    redis_server.start(10.0, *slow, loading=True)
    settings = redis_settings(tiny_bundle_root, redis_server)
    with TestClient(create_app(settings)) as client:
        r = client.post("/events", json=events("amy", ["books-0001"]))
    assert r.status_code == 503, r.text
    assert "BusyLoadingError" in r.json()["detail"]
    assert r.json()["detail"].endswith("nothing was stored")
    deadline = time.monotonic() + 30
    while True:
        try:
            assert redis.exists(history_key("amy")) == 0 and redis.exists(EVENTS_STREAM) == 0
            break
        except BusyLoadingError:
            assert time.monotonic() < deadline, "Redis never finished loading"
            time.sleep(0.1)


def test_stream_maxlen_trims_the_stream_approximately(
    tiny_bundle_root: Path, redis_server: RedisServer
) -> None:
    settings = redis_settings(tiny_bundle_root, redis_server, stream_maxlen=1, max_events=1000)
    items = [f"books-{i % 200 + 1:04d}" for i in range(250)]
    with TestClient(create_app(settings)) as client:
        assert client.post("/events", json=events("gina", items)).status_code == 200
    redis = redis_server.client()
    # "MAXLEN ~" drops whole stream nodes (100 entries by default), so some stay beyond 1.
    assert 1 <= redis.xlen(EVENTS_STREAM) < 250
    assert redis.lrange(history_key("gina"), 0, -1) == items[-5:]
    last = redis.xrevrange(EVENTS_STREAM, count=1)[0][1]
    assert last == {"user_id": "gina", "item_id": items[-1], "timestamp": str(1_700_000_249)}


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://:s3cret@redis.internal:6379/2", "redis://***@redis.internal:6379/2"),
        ("rediss://app:s3cret@redis.internal/0", "rediss://app:***@redis.internal/0"),
        ("redis://app@redis.internal/0", "redis://app@redis.internal/0"),
        ("redis://host/0?password=s3cret", "redis://host/0?password=***"),
        (
            "unix:///tmp/r.sock?db=0&password=s3cret",
            "unix:///tmp/r.sock?db=0&password=***",
        ),
        (
            "redis://:p@ss@host/0?socket_timeout=1&Password=s3cret&username=app",
            "redis://***@host/0?socket_timeout=1&Password=***&username=app",
        ),
    ],
)
def test_redact_hides_passwords_in_userinfo_and_query(url: str, redacted: str) -> None:
    assert _redact(url) == redacted
    assert "s3cret" not in _redact(url) and "p@ss" not in _redact(url)


def test_redis_password_in_query_string_does_not_leak(
    tiny_bundle_root: Path, tmp_path: Path
) -> None:
    url = f"unix://{tmp_path / 'nothing-here.sock'}?db=0&password=s3cret"
    settings = Settings(bundle_root=tiny_bundle_root, redis_url=url, reload_interval_s=0)
    with TestClient(create_app(settings)) as client:
        r = client.post("/recommend", json={"user_id": "zed"})
        assert r.status_code == 503, r.text
        assert "password=***" in r.json()["detail"]
        assert "s3cret" not in r.text
        assert "s3cret" not in client.get("/readyz").text


class ReplyDelayingProxy:
    """A TCP proxy in front of Redis that holds, while `delay_s` > 0, every reply to a
    connection whose last command was a script (EVAL/EVALSHA): the write runs at once, its
    answer arrives late."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.delay_s = 0.0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.server.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            last = {"script": False}
            threading.Thread(
                target=self._pump, args=(client, upstream, last, True), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, last, False), daemon=True
            ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, last: dict, requests: bool) -> None:
        try:
            while data := src.recv(65536):
                if requests:
                    last["script"] = b"EVAL" in data.upper()
                elif last["script"] and self.delay_s:
                    time.sleep(self.delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()


def test_events_whose_reply_is_late_are_stored_once_and_answered_200(
    tiny_bundle_root: Path, redis_server: RedisServer
) -> None:
    # The write runs in time but its reply comes after the budget (0.5 s): that was a 503
    # "nothing was stored" with the events stored, and a client's retry stored them twice.
    proxy = ReplyDelayingProxy(redis_server.port)
    settings = redis_settings(tiny_bundle_root, redis_server)
    settings = settings.model_copy(update={"redis_url": proxy.url})
    try:
        with TestClient(create_app(settings)) as client:
            assert client.post("/events", json=events("late", ["books-0001"])).status_code == 200
            proxy.delay_s = 0.8
            r = client.post("/events", json=events("late", ["books-0002"], start=1_700_000_100))
            assert r.status_code == 200, r.text
            proxy.delay_s = 0.0
        redis = redis_server.client()
        assert redis.lrange(history_key("late"), 0, -1) == ["books-0001", "books-0002"]
        assert redis.xlen(EVENTS_STREAM) == 2
    finally:
        proxy.close()


def test_stored_histories_match_a_stable_sort_by_timestamp(redis_server: RedisServer) -> None:
    """Seeded requests of several users' events in any order, with equal timestamps, against
    the reference: each user's events sorted stably by timestamp (arrival order among equals),
    the newest `cap` kept."""
    import asyncio
    import random

    from service.history import Event, HistoryStore

    rng = random.Random(7)
    redis = redis_server.client()
    stored: dict[str, list[tuple[float, int, str]]] = {}  # user -> (ts, arrival, item)
    arrival = 0

    async def run() -> None:
        nonlocal arrival
        store = HistoryStore(redis_server.url, 5.0, history_cap=6)
        try:
            for _ in range(60):
                batch = []
                for _ in range(rng.randint(1, 8)):
                    user = f"fuzz-{rng.randint(0, 3)}"
                    ts = 1_700_000_000 + rng.choice([rng.randint(0, 40), 20, 20.5])
                    item = f"item-{arrival}"
                    batch.append(Event(user, item, ts))
                    stored.setdefault(user, []).append((ts, arrival, item))
                    arrival += 1
                await store.append(batch)
        finally:
            await store.close()

    for user in [f"fuzz-{i}" for i in range(4)]:
        redis.delete(history_key(user), history_times_key(user))
    asyncio.run(run())
    for user, events in stored.items():
        expected = [item for _, _, item in sorted(events)[-6:]]
        assert redis.lrange(history_key(user), 0, -1) == expected, user


def test_a_late_event_reads_only_the_entries_newer_than_it(
    tiny_bundle_root: Path, redis_server: RedisServer
) -> None:
    # The script read every stored timestamp for an event a second late: at a cap of 10^6, a
    # second of Redis blocked for every client. It now reads the tail, doubling: these land
    # 100 entries from the end (past the first 64 read), at the start, and before everything.
    redis = redis_server.client()
    stored = [f"s{k}" for k in range(1000)]
    redis.rpush(history_key("gus"), *stored)
    redis.rpush(history_times_key("gus"), *[str(1_700_000_000 + k) for k in range(1000)])
    settings = redis_settings(tiny_bundle_root, redis_server, history_cap=2000)
    late = [("late-1", 899.5), ("late-2", 10.5), ("late-3", -1.0)]
    body = {"events": [{"user_id": "gus", "item_id": i, "timestamp": 1_700_000_000 + t}
                       for i, t in late]}  # fmt: skip
    with TestClient(create_app(settings)) as client:
        assert client.post("/events", json=body).status_code == 200
    expected = ["late-3", *stored[:11], "late-2", *stored[11:900], "late-1", *stored[900:]]
    assert redis.lrange(history_key("gus"), 0, -1) == expected
    times = [float(t) for t in redis.lrange(history_times_key("gus"), 0, -1)]
    assert times == sorted(times) and len(times) == 1003


def test_a_redis_without_hello_is_served(
    tiny_bundle_root: Path, redis_without_hello: RedisServer
) -> None:
    # redis-py 8 opens every connection with HELLO 3, which Redis 5 (documented as enough)
    # does not know: every history read and event write was a 503 there.
    settings = redis_settings(tiny_bundle_root, redis_without_hello)
    with TestClient(create_app(settings)) as client:
        r = client.post("/events", json=events("hal", ["books-0001", "books-0002"]))
        assert r.status_code == 200, r.text
        r = client.post("/recommend", json={"user_id": "hal", "n": 3})
        assert r.status_code == 200 and r.json()["known_history_length"] == 2, r.text
        assert client.get("/readyz").json()["redis"]["ok"]


def test_a_long_late_batch_is_stored_in_one_pass(
    tiny_bundle_root: Path, redis_server: RedisServer
) -> None:
    # 1,000 events newest first (the most a request may send): each one was inserted on its
    # own before the rest, a second of Redis time, so the request timed out (503, "may or may
    # not have been stored") although every event was stored.
    settings = redis_settings(tiny_bundle_root, redis_server, max_events=1000, history_cap=200)
    newest_first = [
        {"user_id": "fred", "item_id": f"i{k}", "timestamp": 1_700_000_000 + 1000 - k}
        for k in range(1000)
    ]
    with TestClient(create_app(settings)) as client:
        r = client.post("/events", json={"events": newest_first})
    assert r.status_code == 200, r.text
    expected = [f"i{k}" for k in range(199, -1, -1)]  # the 200 newest, oldest first
    assert redis_server.client().lrange(history_key("fred"), 0, -1) == expected
