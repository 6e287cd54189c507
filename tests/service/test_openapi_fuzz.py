"""Schemathesis over the served OpenAPI schema: no 5xx, and every answer is one the schema
declares (status, content type, headers, body), on a real server with a real Redis."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import service.openapi
import service.schemas
from remi_core.redis_keys import latest_timestamp
from service.app import create_app
from service.settings import Settings
from tests.helpers import RedisServer, dead_redis_url, free_port

pytestmark = pytest.mark.integration
API_KEY = "fuzz-key"
EXAMPLES = 100  # per operation and mode: ~1,000 requests, about half a minute on 2 cores
CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(autouse=True)
def _one_day(monkeypatch: pytest.MonkeyPatch) -> None:
    """The events' timestamp bound held where it is: the schema is read once, the cases run for
    half a minute, and a midnight (UTC) between would move the bound the negative cases test."""
    bound = latest_timestamp()
    for module in (service.openapi, service.schemas):
        monkeypatch.setattr(module, "latest_timestamp", lambda: bound)


def fuzz_settings(bundle_root: Path, redis_url: str) -> Settings:
    # Small limits keep generated bodies small; keys and a token make every route answer.
    return Settings(
        bundle_root=bundle_root,
        redis_url=redis_url,
        reload_interval_s=0,
        max_n=20,
        max_history=30,
        max_batch=4,
        max_events=5,
        admin_token="fuzz-admin",
        api_keys=API_KEY,
        # The fuzzer shares this process's GIL with the server: a stall must not read as Redis
        # timing out (a 503). Redis down is its own mode, refused at once.
        redis_timeout_s=5.0,
    )


@contextlib.contextmanager
def serving(app_settings: Settings) -> Iterator[str]:
    """A real uvicorn server in a thread; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(create_app(app_settings), port=port, log_level="critical")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@schemathesis.check
def no_server_error_but_503(ctx, response, case) -> bool | None:
    """With Redis down, 503 is the declared answer; any other 5xx is a bug."""
    assert response.status_code < 500 or response.status_code == 503, response.text
    return True


REDIS_DOWN_CHECKS = [no_server_error_but_503, *CONFORMANCE[1:]]


def fuzz(operation, mode: GenerationMode, conformance: list = CONFORMANCE) -> None:
    """Send EXAMPLES generated requests to one operation and check every answer."""
    # Negative cases break the schema on purpose: the server must refuse each one.
    checks = conformance + ([negative_data_rejection] if mode.is_negative else [])

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases every run
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        case.call_and_validate(headers={"X-API-Key": API_KEY}, checks=checks)

    try:
        run()
    except Unsatisfiable:
        if not mode.is_negative:
            raise  # an operation without parameters or body has nothing to negate


def test_fuzzed_requests_get_declared_answers_and_no_5xx(
    tiny_bundle_root: Path, redis_server: RedisServer
) -> None:
    with serving(fuzz_settings(tiny_bundle_root, redis_server.url)) as base_url:
        schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == 8
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(operation, mode)


def test_fuzzed_requests_while_redis_is_down(tiny_bundle_root: Path) -> None:
    # The 503 answers (and their Retry-After header) must match the schema too.
    with serving(fuzz_settings(tiny_bundle_root, dead_redis_url())) as base_url:
        schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.path in ("/events", "/recommend", "/recommend/batch", "/readyz"):
                fuzz(
                    operation, GenerationMode.POSITIVE, [no_server_error_but_503, *CONFORMANCE[1:]]
                )
