"""Issue 12, service points: limits, error shapes, timestamps, secrets, API keys, hung Redis."""

from __future__ import annotations

import gzip
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from typer.testing import CliRunner

from remi_core.redis_keys import (
    EVENTS_STREAM,
    history_key,
    history_times_key,
    latest_timestamp,
)
from service.app import MetricsMiddleware, create_app
from service.body import MAX_LISTED_ERRORS
from service.cli import app as cli_app
from service.metrics import Metrics
from service.redact import redact_url, scrub_secrets
from service.settings import Settings, describe_error
from tests.helpers import RedisServer, dead_redis_url

NOW = 1_700_000_000


def make_settings(root: Path, redis_url: str | None = None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "bundle_root": root,
        "redis_url": redis_url or dead_redis_url(),
        "reload_interval_s": 0,
    }
    return Settings(**{**values, **overrides})


@pytest.fixture
def client(tiny_bundle_root: Path) -> Iterator[TestClient]:
    """An app without Redis: enough for everything that never reaches the store."""
    with TestClient(create_app(make_settings(tiny_bundle_root))) as client:
        yield client


def events_body(user: str, items: list[str], start: float = NOW) -> dict:
    return {
        "events": [
            {"user_id": user, "item_id": item, "timestamp": start + i}
            for i, item in enumerate(items)
        ]
    }


# --- 6: Redis passwords never printed -----------------------------------------------------------


def test_wrong_redis_scheme_does_not_print_the_password(tiny_bundle_root: Path) -> None:
    env = {"REMI_REDIS_URL": "redis2://app:hunter2-secret@redis:6379/0"}
    result = CliRunner().invoke(cli_app, ["--bundle-root", str(tiny_bundle_root)], env=env)
    assert result.exit_code == 2
    assert "must start with redis://" in result.output
    assert "redis2://app:***@redis:6379/0" in result.output
    assert "hunter2" not in result.output


@pytest.mark.parametrize(
    "url",
    [
        "redis://redis:6379/0?timeout=3",  # the asyncio pool's wait for a connection
        "redis://redis:6379/0/",  # redis-py reads these as database 0, as written
        "redis://redis:6379/%30",
        "rediss://redis:6380/1?ssl_cert_reqs=none",
        "unix:///run/redis.sock?db=2",
    ],
)
def test_redis_urls_redis_py_reads_as_written_are_taken(url: str) -> None:
    assert Settings(redis_url=url).redis_url == url


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"REMI_MAX_N": "abc"}, "REMI_MAX_N: Input should be a valid integer"),
        # inf overflowed the /events token's lifetime: a 500, or a 503 "nothing was stored" for
        # events Redis had stored (the script's last command failed after its writes).
        ({"REMI_REDIS_TIMEOUT_S": "inf"}, "REMI_REDIS_TIMEOUT_S: Input should be a finite number"),
        ({"REMI_REDIS_TIMEOUT_S": "1e300"}, "REMI_REDIS_TIMEOUT_S: Input should be less than"),
        ({"REMI_BODY_TIMEOUT_S": "inf"}, "REMI_BODY_TIMEOUT_S: Input should be a finite number"),
        # NaN fails every bound: it was refused as "less than or equal to 60" (or 1000).
        ({"REMI_GRACEFUL_SHUTDOWN_S": "nan"}, "REMI_GRACEFUL_SHUTDOWN_S: Input should be a finite"),
        ({"REMI_BATCH_WAIT_MS": "nan"}, "REMI_BATCH_WAIT_MS: Input should be a finite number"),
        ({"REMI_RELOAD_INTERVAL_S": "inf"}, "REMI_RELOAD_INTERVAL_S: Input should be a finite"),
        ({"REMI_HISTORY_CAP": "100000000000000000000"}, "REMI_HISTORY_CAP: Input should be"),
        # Past 2^63 n overflowed the search (a 500 on every request), max_history Redis's
        # LRANGE (a 503 "Redis unavailable"), a thread count torch or OpenMP (a dead worker).
        ({"REMI_MAX_N": "1" + "0" * 23}, "REMI_MAX_N: Input should be less than or equal to"),
        ({"REMI_MAX_HISTORY": "1" + "0" * 20}, "REMI_MAX_HISTORY: Input should be less than"),
        ({"REMI_MAX_BATCH": "1000001"}, "REMI_MAX_BATCH: Input should be less than or equal"),
        ({"REMI_MAX_EVENTS": "1000001"}, "REMI_MAX_EVENTS: Input should be less than or equal"),
        ({"REMI_TORCH_THREADS": "2147483647"}, "REMI_TORCH_THREADS: Input should be less than"),
        # Each worker would spin a core on readlink.
        ({"REMI_RELOAD_INTERVAL_S": "1e-9"}, "REMI_RELOAD_INTERVAL_S: must be 0 (off) or at"),
        # redis-py read /O as database 0 and passed -1 on for Redis to refuse at every command.
        ({"REMI_REDIS_URL": "redis://redis:6379/O"}, "database must be a whole number >= 0"),
        ({"REMI_REDIS_URL": "redis://redis:6379/-1"}, "database must be a whole number >= 0"),
        ({"REMI_REDIS_URL": "unix://"}, "a unix:// URL needs the socket's path"),
        # Options the connection does not take: a TypeError traceback in every worker's start.
        ({"REMI_REDIS_URL": "redis://redis:6379/0?ssl=true"}, "'ssl' is not an option of a"),
        ({"REMI_REDIS_URL": "redis://r/0?sockettimeout=1"}, "'sockettimeout' is not an option"),
        # Only the sync connection takes it: the service's asyncio pool failed at start-up.
        ({"REMI_REDIS_URL": "rediss://r/0?ssl_validate_ocsp=true"}, "'ssl_validate_ocsp' is"),
        # Empty: the working directory, for the bundles or as the keys "file".
        ({"REMI_BUNDLE_ROOT": ""}, "REMI_BUNDLE_ROOT: must be a path, not an empty string"),
        ({"REMI_API_KEYS_FILE": " "}, "REMI_API_KEYS_FILE: must be a path, not an empty string"),
    ],
)
def test_settings_errors_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict, says: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert says in describe_error(caught.value)


def test_remi_serve_names_the_variable_of_a_bad_setting(tiny_bundle_root: Path) -> None:
    env = {"REMI_MAX_N": "abc", "REMI_BODY_TIMEOUT_S": "0"}
    result = CliRunner().invoke(cli_app, ["--bundle-root", str(tiny_bundle_root)], env=env)
    assert result.exit_code == 2, result.output
    assert "REMI_MAX_N: Input should be a valid integer" in result.output
    assert "REMI_BODY_TIMEOUT_S: Input should be greater than 0" in result.output
    assert "Traceback" not in result.output


def test_an_empty_stream_maxlen_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMI_STREAM_MAXLEN", "")  # compose's `${REMI_STREAM_MAXLEN:-}`
    assert Settings().stream_maxlen is None


@pytest.mark.parametrize(
    ("url", "says"),
    [
        # The unencoded "/" cuts the password: redis-py reads "pa55" as the port and says so.
        ("redis://app:pa55/word@localhost:6379/0", "Port could not be cast to integer"),
        # A piece shorter than the scrubber looks for ("ab") was quoted as it was.
        ("redis://app:ab/cdefgh@redis:6379/0", "Port could not be cast to integer value as '***'"),
        # ... and an option's name, which is no part of the password, stays.
        ("redis://:pa55word@h:6379/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
        ("redis://127.0.0.1:notaport/0", "Port could not be cast to integer value as 'notaport'"),
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
    ],
)
def test_an_unparseable_redis_url_is_a_settings_error(
    tiny_bundle_root: Path, url: str, says: str
) -> None:
    # It was found by each worker's start-up: under --workers N a traceback per worker and exit 0.
    with pytest.raises(ValidationError) as caught:
        make_settings(tiny_bundle_root, url)
    message = describe_error(caught.value)
    assert message.startswith(f"REMI_REDIS_URL: invalid Redis URL {redact_url(url)}: {says}")
    assert not any(piece in message for piece in ("pa55", "word", "'ab'", "cdefgh"))


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret@127.0.0.1:{port}/0",
        "redis://app:s3cret@127.0.0.1:{port}/0",
        "redis://127.0.0.1:{port}/0?password=s3cret",
    ],
)
def test_redis_errors_in_readyz_and_503_hide_the_password(
    tiny_bundle_root: Path, redis_server: RedisServer, url: str
) -> None:
    # A real Redis that wants another password: AUTH fails, and no error may quote ours.
    redis_server.client().config_set("requirepass", "the-right-one")
    settings = make_settings(tiny_bundle_root, url.format(port=redis_server.port))
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz").json()
        assert ready["redis"]["ok"] is False
        r = client.post("/recommend", json={"user_id": "zed"})
        assert r.status_code == 503
        assert "s3cret" not in r.text and "s3cret" not in str(ready)


def test_scrub_secrets_hides_whole_passwords_and_their_pieces() -> None:
    url = "redis://app:pa55/w%40rd@host/0?password=other-one"
    text = "port 'pa55' for pa55/w%40rd or pa55/w@rd; password other-one"
    scrubbed = scrub_secrets(text, url)
    for secret in ("pa55", "w%40rd", "w@rd", "other-one"):
        assert secret not in scrubbed
    assert redact_url(url) == "redis://app:***@host/0?password=***"


# --- 8: a hung Redis costs one timeout, and a 503 on /events means "not stored" -----------------


@pytest.fixture
def slow_client(tiny_bundle_root: Path, redis_server: RedisServer) -> Iterator[TestClient]:
    """An app on a real Redis with a 1 s timeout: long enough to tell one timeout from two."""
    settings = make_settings(tiny_bundle_root, redis_server.url, redis_timeout_s=1.0)
    with TestClient(create_app(settings)) as client:
        yield client


def stored(redis_server: RedisServer, user: str) -> tuple[list[str], int]:
    redis = redis_server.client()
    return redis.lrange(history_key(user), 0, -1), redis.xlen(EVENTS_STREAM)


def test_hung_redis_answers_503_after_one_timeout_and_stores_nothing(
    slow_client: TestClient, redis_server: RedisServer
) -> None:
    assert slow_client.post("/events", json=events_body("warm", ["a"])).status_code == 200
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        for path, body in [
            ("/events", events_body("alice", ["books-0001", "books-0002"])),
            ("/recommend", {"user_id": "alice"}),
        ]:
            start = time.monotonic()
            r = slow_client.post(path, json=body)
            elapsed = time.monotonic() - start
            assert r.status_code == 503, r.text
            # Under 1.9 s: a second timeout on the way (2 s) is what this guards against.
            assert 0.9 < elapsed < 1.9, f"{path}: {elapsed:.2f} s for a 1 s timeout"
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    time.sleep(0.3)  # whatever Redis had queued runs now
    assert stored(redis_server, "alice") == ([], 1)  # the 503 meant "not stored"
    assert slow_client.post("/events", json=events_body("alice", ["books-0001"])).status_code == 200
    assert stored(redis_server, "alice") == (["books-0001"], 2)


def test_events_script_refuses_to_write_after_its_deadline(
    slow_client: TestClient, redis_server: RedisServer
) -> None:
    # CLIENT PAUSE WRITE holds scripts but lets TIME through: the service learns Redis's clock,
    # its script waits past the client's timeout, then runs when the pause ends.
    assert slow_client.post("/events", json=events_body("warm", ["a"])).status_code == 200
    redis = redis_server.client()
    redis.execute_command("CLIENT", "PAUSE", "2000", "WRITE")
    start = time.monotonic()
    r = slow_client.post("/events", json=events_body("bob", ["books-0001", "books-0002"]))
    assert r.status_code == 503, r.text
    assert time.monotonic() - start < 1.9  # not held until the pause ends (2 s)
    assert "nothing was stored" in r.json()["detail"]
    time.sleep(max(0.0, 2.3 - (time.monotonic() - start)))  # the pause is over: the script ran
    assert stored(redis_server, "bob") == ([], 1)


# --- 1: request size limits ---------------------------------------------------------------------


def call_asgi(app: Any, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple:
    """Drive the ASGI app directly, counting how many body chunks it pulled."""
    import asyncio

    pulled = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": True}
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/recommend",
        "raw_path": b"/recommend",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), *headers],
        "server": ("test", 80),
        "client": ("test", 1),
    }
    asyncio.run(app(scope, receive, send))
    return pulled, sent


def test_oversized_bodies_are_refused_before_being_read(tiny_bundle_root: Path) -> None:
    app = create_app(make_settings(tiny_bundle_root, max_body_bytes=4096))
    chunk = b" " * 1024
    # A declared length over the limit: not one byte is read.
    pulled, sent = call_asgi(app, [(b"content-length", b"50000000")], [chunk] * 100)
    assert pulled == 0
    assert sent[0]["status"] == 413
    # Chunked (no length): reading stops at the first chunk past the limit.
    pulled, sent = call_asgi(app, [(b"transfer-encoding", b"chunked")], [chunk] * 100)
    assert pulled == 5
    assert sent[0]["status"] == 413
    body = __import__("json").loads(sent[1]["body"])
    assert body["errors"] is None
    assert "limit of 4096 bytes (REMI_MAX_BODY_BYTES)" in body["detail"]


def test_a_client_gone_mid_body_counts_as_499_not_500(tiny_bundle_root: Path) -> None:
    # Monitoring alerts on 5xx: a client that hangs up while sending is not a server error.
    app = create_app(make_settings(tiny_bundle_root))
    pulled, sent = call_asgi(app, [(b"content-length", b"3000")], [b'{"history": [' + b" " * 999])
    assert pulled == 1 and sent == []  # read what came, then the disconnect: nobody to answer
    text = app.state.metrics.exposition().decode()
    assert 'status="499"' in text
    assert 'status="500"' not in text


def test_a_request_is_counted_before_its_last_byte_is_sent() -> None:
    # Under --workers N a client that scrapes /metrics as soon as it has its answer may reach
    # another worker while this one is still sending: the count must be in before the end.
    import asyncio

    metrics = Metrics()
    counted = 'remi_http_requests_total{endpoint="unmatched",method="GET",status="200"} 1.0'
    seen: list[tuple[bool, bool]] = []  # (more body to come, counted yet) per body part

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"[1,", "more_body": True})
        await send({"type": "http.response.body", "body": b"2]"})

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            seen.append((message.get("more_body", False), counted in metrics.exposition().decode()))

    scope = {"type": "http", "method": "GET", "path": "/somewhere"}
    asyncio.run(MetricsMiddleware(app, metrics)(scope, None, send))
    assert seen == [(True, False), (False, True)]
    assert metrics.exposition().decode().count('status="200"} 1.0') == 1  # counted once


@pytest.mark.parametrize("fast_lane", [True, False])
def test_a_client_that_leaves_while_queued_is_not_computed(
    tiny_bundle_root: Path, fast_lane: bool
) -> None:
    # The request waits in the queue (a 1 s batch wait); its client hangs up after 0.1 s. It
    # must leave the queue then, answered 499, with nothing computed for it.
    import asyncio

    settings = make_settings(tiny_bundle_root, batch_wait_ms=1000, fast_lane=fast_lane)
    body = b'{"history": ["books-0001", "books-0002"], "n": 5}'
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/recommend", "raw_path": b"/recommend", "query_string": b"",
        "root_path": "", "server": ("test", 80), "client": ("test", 1),
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }  # fmt: skip
    sent: list[dict] = []

    async def request() -> float:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await asyncio.sleep(0.1)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        start = time.monotonic()
        await client.app(scope, receive, send)
        return time.monotonic() - start

    with TestClient(create_app(settings)) as client:
        took = client.portal.call(request)
        metrics = client.get("/metrics").text
    assert took < 0.95  # gone after 0.1 s, not answered after the 1 s wait
    assert sent[0]["status"] == 499
    assert 'remi_http_requests_total{endpoint="/recommend",method="POST",status="499"} 1.0' in (
        metrics
    )
    assert "remi_batch_users_count 0.0" in metrics


def test_body_limit_over_http_and_bodies_within_it_still_work(tiny_bundle_root: Path) -> None:
    with TestClient(create_app(make_settings(tiny_bundle_root, max_body_bytes=2048))) as client:
        r = client.post("/recommend", json={"history": ["x" * 200] * 20})
        assert r.status_code == 413
        assert set(r.json()) == {"detail", "errors"}
        r = client.post("/recommend", json={"history": ["books-0001"] * 50, "n": 3})
        assert r.status_code == 200, r.text
        assert client.post("/recommend/batch", content=b"[" * 4096).status_code == 413
        assert client.post("/nowhere", json={}).status_code == 404
        assert client.get("/openapi.json").status_code == 200  # a route FastAPI adds itself
        metrics = client.get("/metrics").text
    # Answered before routing, and still counted under their route (they were "unmatched").
    for line in ('{endpoint="/recommend",method="POST",status="413"} 1.0',
                 '{endpoint="/recommend/batch",method="POST",status="413"} 1.0',
                 '{endpoint="unmatched",method="POST",status="404"} 1.0',
                 '{endpoint="/openapi.json",method="GET",status="200"} 1.0'):  # fmt: skip
        assert f"remi_http_requests_total{line}" in metrics


def test_unknown_ids_echoed_back_are_capped(client: TestClient) -> None:
    unknown = [f"nope-{i:04d}-" + "x" * 240 for i in range(999)]
    body = {"requests": [{"history": [*unknown, "books-0001"], "n": 5}] * 8}
    r = client.post("/recommend/batch", json=body)
    assert r.status_code == 200, r.text
    assert len(r.content) < 400_000  # was 8 x 1000 x 256 characters of echoed ids
    for result in r.json()["results"]:
        assert result["unknown_count"] == 999
        assert result["unknown_ids"] == unknown[:100]
        assert result["known_history_length"] == 1


def test_default_body_limit_fits_a_full_batch_of_realistic_ids() -> None:
    settings = Settings()
    entry = {"history": [f"item-{i:032d}" for i in range(settings.max_history)], "n": 50}
    size = len(__import__("json").dumps({"requests": [entry] * settings.max_batch}))
    assert size < settings.max_body_bytes


# --- 2: bodies that are not JSON get the documented shape --------------------------------------


@pytest.mark.parametrize(
    ("content", "headers", "says"),
    [
        (b'{"history": ["\xff\xfe"]}', {"content-type": "application/json"}, "not valid JSON"),
        (b'{"history": [', {"content-type": "application/json"}, "not valid JSON"),
        (b'{"history": ["a"]}', {"content-type": "text/plain"}, "Content-Type: application/json"),
        (b'{"history": ["a"]}', {}, "Content-Type: application/json"),
        (b"", {"content-type": "application/json"}, "request body is missing"),
    ],
)
def test_bodies_that_are_not_json_get_422_in_the_error_shape(
    client: TestClient, content: bytes, headers: dict, says: str
) -> None:
    for path in ("/recommend", "/recommend/batch", "/events"):
        r = client.post(path, content=content, headers=headers)
        assert r.status_code == 422, (path, r.text)
        body = r.json()
        assert says in body["detail"]
        assert body["errors"][0]["type"] in {"json_invalid", "missing"}
        assert set(body["errors"][0]) == {"type", "loc", "msg", "field"}


def test_unknown_routes_and_methods_use_the_error_shape(client: TestClient) -> None:
    assert client.get("/nope").json() == {"detail": "Not Found", "errors": None}
    r = client.post("/healthz")
    assert r.status_code == 405 and r.json()["errors"] is None
    # A 405 lists every method of the path (RFC 9110): HEAD is a route of its own here.
    for path in ("/healthz", "/readyz", "/v1/model", "/metrics", "/openapi.json"):
        assert client.delete(path).headers["allow"] == "GET, HEAD", path
    assert client.get("/recommend").headers["allow"] == "POST"
    # No redirect to the slash-less path: its Location would be built from the Host header.
    r = client.post("/recommend/", json={"history": ["books-0001"]}, follow_redirects=False)
    assert r.status_code == 404 and r.json()["errors"] is None


@pytest.mark.parametrize("path", ["/recommend", "/recommend/batch", "/events"])
def test_body_problems_are_422_that_say_what_is_wrong(client: TestClient, path: str) -> None:
    json_headers = {"content-type": "application/json"}
    # Nested past the decoder's recursion limit: was FastAPI's bare 400.
    deep = b'{"history": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    r = client.post(path, content=deep, headers=json_headers)
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == (
        "request body is not valid JSON: arrays or objects are nested too deeply"
    )
    # A syntax error names its reason, not only where it is.
    r = client.post(path, content=b'{"history": ["a" "b"]}', headers=json_headers)
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "request body is not valid JSON (at character 17): Expecting ',' delimiter"
    )
    # Python's cap on integer digits: its message told the client to raise a server limit.
    for at, body in ((13, b'{"history": [' + b"1" * 5000 + b"]}"),
                     (24, b'{"history": ["a"], "n": ' + b"9" * 5000 + b"}")):  # fmt: skip
        r = client.post(path, content=body, headers=json_headers)
        assert r.status_code == 422
        assert r.json()["detail"] == (
            f"request body is not valid JSON (at character {at}): Integer with more than 4300 "
            "digits"
        )
    # A compressed body is refused as such, not decoded as if it were UTF-8.
    r = client.post(
        path, content=gzip.compress(b"{}"), headers={**json_headers, "content-encoding": "gzip"}
    )
    assert r.status_code == 415 and "send the body uncompressed" in r.json()["detail"]


def test_an_invalid_body_lists_its_first_errors_and_counts_the_rest(client: TestClient) -> None:
    """256 entries of 1,000 wrong ids are 256,000 errors: listed in full, a 0.5 MB body made a
    50 MB answer built on the event loop."""
    batch = {"requests": [{"history": list(range(1000))} for _ in range(256)]}
    r = client.post("/recommend/batch", json=batch)
    assert r.status_code == 422 and len(r.content) < 10_000
    body = r.json()
    assert len(body["errors"]) == MAX_LISTED_ERRORS
    assert body["errors"][0]["field"] == "requests.0.history.0"
    assert body["detail"].endswith(
        f"; and {256_000 - MAX_LISTED_ERRORS} more errors (the first 20 listed)"
    )
    events = {"events": [{"user_id": 1, "item_id": 2, "timestamp": "x"}] * 1000}
    r = client.post("/events", json=events)
    assert r.status_code == 422 and len(r.json()["errors"]) == MAX_LISTED_ERRORS
    assert "; and 2980 more errors" in r.json()["detail"]
    # A few errors are all listed, with no count.
    r = client.post("/recommend", json={"history": [1, 2]})
    assert len(r.json()["errors"]) == 2 and "more errors" not in r.json()["detail"]


@pytest.mark.parametrize(
    ("path", "body", "field", "says"),
    [
        ("/recommend", {"history": [1] * 1_000_000}, "history", "at most 1000 items, not 1000000"),
        (
            "/recommend/batch",
            {"requests": [{}] * 300_000},
            "requests",
            "at most 256 entries, not 300000",
        ),
        (
            "/recommend/batch",
            {"requests": [{"history": ["a"]}, {"history": [1] * 5000}]},
            "requests.1.history",
            "at most 1000 items, not 5000",
        ),
        ("/events", {"events": [{}] * 1_000_000}, "events", "at most 1000 events per request"),
    ],
)
def test_lists_past_their_limit_are_refused_before_their_items_are_validated(
    keyed_client: TestClient, path: str, body: dict, field: str, says: str
) -> None:
    # A few MiB of wrong items, within the body limit, were validated item by item before the
    # count was looked at: a million errors, seconds of CPU and gigabytes per request, with no
    # key needed on the recommend routes. One error now, whatever the items.
    headers = {"X-API-Key": "key-one"} if path == "/events" else {}
    r = keyed_client.post(path, json=body, headers=headers)
    assert r.status_code == 422, r.text
    [error] = r.json()["errors"]
    assert error["field"] == field and says in error["msg"]


def test_a_long_unknown_key_is_named_cut_short(client: TestClient) -> None:
    # Sent back whole three times (detail, loc, field): 8 MiB of key made a 25 MB answer.
    r = client.post("/recommend", json={"history": ["books-0001"], "k" * 1_000_000: 1})
    assert r.status_code == 422 and len(r.content) < 2_000, len(r.content)
    [error] = r.json()["errors"]
    assert error["field"] == "k" * 100 + "... (1000000 characters)"
    assert error["loc"] == ["body", error["field"]] and error["type"] == "extra_forbidden"


# --- 5: event timestamps are bounded ------------------------------------------------------------


@pytest.mark.parametrize(
    ("timestamp", "says"),
    [
        (1e308, "the end of tomorrow, UTC"),
        # Clock-relative values are taken when the test runs, not when it is collected: a
        # suite that crosses midnight UTC in between would move "tomorrow" past them.
        ("the first refused", "the end of tomorrow, UTC"),
        ("in two days", "the end of tomorrow, UTC"),
        (-1.0, "greater than or equal to 946684800"),
        (1.0, "greater than or equal to 946684800"),
        (946_684_799.5, "greater than or equal to 946684800"),
        # JSON integers have no bound; these are beyond a float's range.
        (int("9" * 400), "the end of tomorrow, UTC"),
        (-int("9" * 400), "greater than or equal to 946684800"),
    ],
)
def test_event_timestamps_out_of_range_are_422(
    client: TestClient, timestamp: float | str, says: str
) -> None:
    if timestamp == "the first refused":
        timestamp = latest_timestamp()
    elif timestamp == "in two days":
        timestamp = time.time() + 2 * 86_400
    event = {"user_id": "u", "item_id": "books-0001", "timestamp": timestamp}
    r = client.post("/events", json={"events": [event]})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "events.0.timestamp"
    assert says in r.json()["detail"]


def test_event_timestamps_in_range_are_stored(
    slow_client: TestClient, redis_server: RedisServer
) -> None:
    soon = latest_timestamp() - 0.5  # clock skew within the allowance
    for ts in (946_684_800, soon):
        event = {"user_id": "u", "item_id": "books-0001", "timestamp": ts}
        assert slow_client.post("/events", json={"events": [event]}).status_code == 200
    fields = [f for _, f in redis_server.client().xrange(EVENTS_STREAM)]
    assert [f["timestamp"] for f in fields] == ["946684800", repr(soon)]


# --- 7: optional API keys on the data routes ----------------------------------------------------


@pytest.fixture
def keyed_client(
    tiny_bundle_root: Path, redis_server: RedisServer, tmp_path: Path
) -> Iterator[TestClient]:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# rotated in November\nfile-key-2\n\n")
    settings = make_settings(
        tiny_bundle_root, redis_server.url, api_keys="key-one, key-two", api_keys_file=keys_file
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_data_routes_need_an_api_key_when_keys_are_set(keyed_client: TestClient) -> None:
    calls = [
        ("/events", events_body("carol", ["books-0001"])),
        ("/recommend", {"user_id": "carol"}),
        ("/recommend/batch", {"requests": [{"history": ["books-0001"]}, {"user_id": "carol"}]}),
    ]
    for path, body in calls:
        for headers, says in [
            ({}, "missing API key"),
            ({"X-API-Key": "key-on"}, "wrong API key"),
            ({"X-API-Key": "key-one, key-two"}, "wrong API key"),
            ({"X-API-Key": ""}, "missing API key"),
        ]:
            r = keyed_client.post(path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
            assert says in r.json()["detail"]
            # RFC 9110: a 401 names how to authenticate.
            assert r.headers["www-authenticate"] == 'ApiKey header="X-API-Key"'

        # Blanks after a value are not part of it (RFC 9110); httptools, which remi-serve runs,
        # leaves them in the header.
        for key in ("key-one", "key-two", "file-key-2", "key-one \t"):
            r = keyed_client.post(path, json=body, headers={"X-API-Key": key})
            assert r.status_code == 200, (path, key, r.text)
    # The key comes first: a client without one is refused before its body is even decoded.
    headers = {"content-type": "application/json"}
    r = keyed_client.post("/events", content=b'{"events": [' + b"[" * 5000, headers=headers)
    assert r.status_code == 401, r.text
    # Without a stored history nothing private is read: history requests stay open.
    assert keyed_client.post("/recommend", json={"history": ["books-0001"]}).status_code == 200
    batch = {"requests": [{"history": ["books-0001"]}]}
    assert keyed_client.post("/recommend/batch", json=batch).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/v1/model"):
        assert keyed_client.get(path).status_code == 200


def test_data_routes_are_open_without_keys(slow_client: TestClient) -> None:
    assert slow_client.post("/events", json=events_body("dan", ["books-0001"])).status_code == 200
    assert slow_client.post("/recommend", json={"user_id": "dan"}).status_code == 200


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"api_keys": " , "}, "holds no key"),
        ({"api_keys_file": "/nonexistent/keys"}, "REMI_API_KEYS_FILE cannot be read"),
        ({"api_keys_file": "/proc/self/exe"}, "REMI_API_KEYS_FILE /proc/self/exe: not UTF-8"),
        # Headers arrive as latin-1: a key sent as UTF-8 "é" would arrive as "Ã©", never match.
        (
            {"api_keys": "key-one, clé-2"},
            r"every API key \(REMI_API_KEYS, REMI_API_KEYS_FILE\) must",
        ),
        ({"admin_token": "jeton-\u00e9"}, "REMI_ADMIN_TOKEN must be printable ASCII"),
        ({"admin_token": "tab\there"}, "REMI_ADMIN_TOKEN must be printable ASCII"),
    ],
)
def test_bad_api_key_settings_are_refused(tiny_bundle_root: Path, values: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        make_settings(tiny_bundle_root, **values)


def test_a_keys_file_without_keys_is_refused_not_open(
    tmp_path: Path, tiny_bundle_root: Path
) -> None:
    # Fails closed: a keys file emptied by a rotation (comments left) opened the data routes.
    keys_file = tmp_path / "keys"
    keys_file.write_text("# rotated in November\n\n")
    with pytest.raises(ValueError, match="REMI_API_KEYS_FILE holds no key; leave it unset"):
        make_settings(tiny_bundle_root, api_keys_file=keys_file)
    with pytest.raises(ValueError, match="REMI_API_KEYS and REMI_API_KEYS_FILE hold no key"):
        make_settings(tiny_bundle_root, api_keys=",", api_keys_file=keys_file)


def test_an_admin_token_read_with_its_newline_still_matches(tiny_bundle_root: Path) -> None:
    # A header value carries no blanks around it, so a token kept with them never matched.
    settings = make_settings(tiny_bundle_root, admin_token="s3cret-token\n")
    with TestClient(create_app(settings)) as client:
        answer = client.post("/admin/reload", headers={"Authorization": "Bearer s3cret-token"})
        assert answer.status_code == 200, answer.text


def test_api_keys_are_never_printed(tiny_bundle_root: Path) -> None:
    settings = make_settings(tiny_bundle_root, api_keys="very-secret-key")
    assert "very-secret-key" not in repr(settings)
    env = {"REMI_API_KEYS": "very-secret-key", "REMI_MAX_N": "0"}
    result = CliRunner().invoke(cli_app, ["--bundle-root", str(tiny_bundle_root)], env=env)
    assert result.exit_code == 2 and "very-secret-key" not in result.output


# --- 3: the OpenAPI schema says what the server accepts -----------------------------------------


def test_openapi_states_limits_rules_and_answers(tiny_bundle_root: Path) -> None:
    limits = {"max_n": 7, "max_history": 9, "max_batch": 3, "max_events": 4}
    settings = make_settings(tiny_bundle_root, api_keys="k", **limits)
    with TestClient(create_app(settings)) as keyed:
        schema = keyed.get("/openapi.json").json()
    models = schema["components"]["schemas"]
    recommend = models["RecommendRequest"]
    assert recommend["properties"]["n"]["maximum"] == 7
    assert recommend["properties"]["n"]["default"] == 7  # the default n is lowered with it
    history = next(b for b in recommend["properties"]["history"]["anyOf"] if "items" in b)
    assert history["maxItems"] == 9 and history["items"]["maxLength"] == 256
    assert models["BatchRequest"]["properties"]["requests"]["maxItems"] == 3
    assert models["EventsRequest"]["properties"]["events"]["maxItems"] == 4
    event = models["EventIn"]["properties"]
    assert event["user_id"]["maxLength"] == event["item_id"]["maxLength"] == 256
    assert event["timestamp"]["minimum"] == 946_684_800
    assert event["timestamp"]["exclusiveMaximum"] == latest_timestamp()
    assert models["RecommendResponse"]["properties"]["unknown_ids"]["maxItems"] == 100

    paths = schema["paths"]
    for path in ("/recommend", "/recommend/batch", "/events"):
        answers = paths[path]["post"]["responses"]
        assert set(answers) == {"200", "401", "408", "409", "413", "415", "422", "503"}
        error = answers["413"]["content"]["application/json"]
        assert error["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
        assert "WWW-Authenticate" in answers["401"]["headers"]
    admin = paths["/admin/reload"]["post"]["responses"]
    assert set(admin) == {"200", "401", "403", "408", "409", "413", "422"}
    assert "WWW-Authenticate" in admin["401"]["headers"]
    assert set(paths["/readyz"]["get"]["responses"]) == {"200", "503"}
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert schema["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"
    assert paths["/events"]["post"]["security"] == [{"ApiKey": []}]
    assert paths["/recommend"]["post"]["security"] == [{"ApiKey": []}, {}]  # history: no key
    assert "HTTPValidationError" not in models  # every 422 is declared in our shape


def test_openapi_one_of_rule_matches_the_server(client: TestClient) -> None:
    import jsonschema_rs  # comes with schemathesis (dev dependencies)

    schema = client.get("/openapi.json").json()
    recommend = {**schema["components"]["schemas"]["RecommendRequest"]}
    validator = jsonschema_rs.validator_for(recommend)
    bodies = [
        {"history": ["books-0001"]},
        {"user_id": "u"},
        {"history": None, "user_id": "u"},
        {"history": ["books-0001"], "user_id": None},
        {"history": ["books-0001"], "user_id": "u"},
        {},
        {"history": None},
        {"history": None, "user_id": None},
    ]
    for body in bodies:
        served = client.post("/recommend", json=body).status_code
        # Redis is down here: a user_id body that passed validation gets 503, not 422.
        assert (served != 422) == validator.is_valid(body), (body, served)


def test_keys_off_the_schema_asks_for_none(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert all("security" not in op for ops in paths.values() for op in ops.values())


def test_a_retried_events_script_writes_once(redis_server: RedisServer) -> None:
    """The script a broken connection makes the client send again (same token) finds the batch
    written and writes nothing more: what makes the one retry of /events exactly-once."""
    import asyncio

    from service.history import _TOKEN_PREFIX, HistoryStore

    async def run_twice() -> list:
        store = HistoryStore(redis_server.url, 1.0, history_cap=5)
        try:
            seconds, micros = await store._client.time()
            deadline = seconds * 1_000_000 + micros + 5_000_000
            keys = [EVENTS_STREAM, f"{_TOKEN_PREFIX}same", history_key("erin"),
                    history_times_key("erin")]  # fmt: skip
            args = [deadline, 3000, 5, "", 3, "erin", "books-0001", "1700000000"]
            first = await store._append_script(keys=keys, args=args)
            # The retry may start after the deadline (the reconnect took a while): it must still
            # report the batch written, or the client answers "nothing was stored" and the
            # caller sends the events again.
            args[0] = seconds * 1_000_000 + micros - 1
            return [first, await store._append_script(keys=keys, args=args)]
        finally:
            await store.close()

    assert asyncio.run(run_twice()) == [None, "done"]
    assert stored(redis_server, "erin") == (["books-0001"], 1)
    ttl = redis_server.client().pttl(f"{_TOKEN_PREFIX}same")
    assert 0 < ttl <= 3000  # the token goes away by itself


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/recommend", {"history": [], "explain": 0}),
        ("/recommend", {"history": ["books-0001"], "n": "5"}),
        ("/recommend", {"history": ["books-0001"], "exclude_history": "yes"}),
        ("/recommend/batch", {"requests": [{"history": [], "explain": "true"}]}),
        ("/events", {"events": [{"user_id": "u", "item_id": "i", "timestamp": "1e9"}]}),
    ],
)
def test_values_of_another_type_are_refused_not_coerced(
    client: TestClient, path: str, body: dict
) -> None:
    # Found by the schemathesis run: lax pydantic took `"explain": 0` for false, though the
    # schema says boolean.
    assert client.post(path, json=body).status_code == 422


def test_a_whole_number_written_with_a_fraction_is_an_integer(client: TestClient) -> None:
    # JSON Schema's "integer", which the OpenAPI document gives `n`, is any number without a
    # fraction: schemathesis sent 5.0 and strict pydantic refused it.
    history = ["books-0001", "books-0002"]
    plain = client.post("/recommend", json={"history": history, "n": 5})
    for body in ({"history": history, "n": 5.0}, {"requests": [{"history": history, "n": 5e0}]}):
        r = client.post("/recommend/batch" if "requests" in body else "/recommend", json=body)
        assert r.status_code == 200, r.text
        answer = r.json()["results"][0] if "requests" in body else r.json()
        assert answer["items"] == plain.json()["items"]
