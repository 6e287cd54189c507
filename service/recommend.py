"""The recommend routes' way to the batcher, and the fast lane that takes POST /recommend there
without FastAPI's per-request machinery.

Under load the event loop is the service's other bottleneck beside the compute thread: it
shares the GIL with it, and a POST /recommend through FastAPI (routing, seven dependencies
solved per request, an exit stack, exception wrappers) cost 0.28 ms of loop CPU, half as much
as encoding and searching a user at 100k items. Most requests are the plain case: a small
valid JSON body with a history, or a user_id and (where keys are configured) a good API key.
`RecommendFastLane` answers exactly those itself with the same pieces the route uses -- the
pydantic model, the limits, the key check, the Redis read, the batcher, the renderer -- and
hands everything else to the FastAPI route with the body replayed: bodies that are large, not
JSON or not valid, a missing or wrong key, or a model not loaded. So every error of the request
itself, and every message in it, stays the route's, and the route stays what OpenAPI
documents; errors met while answering (Redis, shutting down) go through the app's own
handlers. With the lane, the loop spends about 0.13 ms per request (docs/serving.md);
REMI_FAST_LANE=false turns it off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import DataAccess
from service.batcher import MicroBatcher
from service.body import INLINE_BODY_BYTES, limit_errors, sends_json, validate_recommend
from service.errors import Unauthorized
from service.history import HistoryStore
from service.metrics import Metrics
from service.middleware import replaying
from service.recommender import LoadedModel, Result
from service.responses import recommend_json
from service.schemas import RecommendRequest
from service.settings import Settings


async def _histories(
    entries: Sequence[RecommendRequest], store: HistoryStore, settings: Settings
) -> list[Sequence[str]]:
    """Histories from the bodies (the lists themselves: the batcher copies them in its compute
    thread), and from Redis (one round trip) for user_id entries."""
    users = [e.user_id for e in entries if e.history is None]
    stored = iter(await store.histories(users, settings.max_history) if users else [])
    return [e.history if e.history is not None else next(stored) for e in entries]


async def run_recommend(
    batcher: MicroBatcher,
    store: HistoryStore,
    settings: Settings,
    model: LoadedModel,
    entries: Sequence[RecommendRequest],
    render: Callable[[list[Result]], bytes],
    receive: Receive,
) -> Response:
    """Read the stored histories the entries name, then queue the entries with other requests'
    (service/batcher.py); the compute thread encodes, searches and renders the JSON body, so
    nothing heavy runs on the event loop."""
    histories = await _histories(entries, store, settings)
    watch = _DisconnectWatch(receive)
    try:
        body = await batcher.submit(
            model,
            histories,
            n=[e.n for e in entries],
            exclude_history=[e.exclude_history for e in entries],
            explain=[e.explain for e in entries],
            diversity=[e.diversity for e in entries],
            render=render,
            client_gone=watch.gone,
        )
    finally:
        watch.close()
    return Response(body, media_type="application/json")


# How long a request waits before its connection is watched for the client leaving.
WATCH_AFTER_S = 0.05


class _DisconnectWatch:
    """`gone` is done when the client goes away while its request waits, so that the request
    leaves the queue: under overload, computing answers that nobody reads (clients that timed
    out) is what keeps a queue from draining. A request is watched only once it has waited
    WATCH_AFTER_S: a listener for every request cost 5% of one worker's requests/s at 16
    clients (a task and a wake-up each), and a request answered in milliseconds has nothing to
    save."""

    def __init__(self, receive: Receive) -> None:
        loop = asyncio.get_running_loop()
        self.gone: asyncio.Future = loop.create_future()
        self._receive = receive
        self._listener: asyncio.Task | None = None
        self._timer = loop.call_later(WATCH_AFTER_S, self._listen)

    def _listen(self) -> None:
        self._listener = asyncio.ensure_future(self._until_disconnected())

    async def _until_disconnected(self) -> None:
        # The body is read: the server's next message is the disconnect (or the end of the
        # answer, which comes only after `close`).
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self.gone.done():
            self.gone.set_result(None)

    def close(self) -> None:
        self._timer.cancel()
        if self._listener is not None:
            self._listener.cancel()


class RecommendFastLane:
    """ASGI middleware: answers the plain POST /recommend itself (see the module docstring).

    It sits inside the body limit and the metrics middleware, so both apply to it as to the
    route; the requests it answers are counted under the route's template, and
    remi_fast_lane_requests_total says which way each request went.
    """

    def __init__(self, app: ASGIApp, service: FastAPI, route: APIRoute) -> None:
        self.app = app
        self.service = service  # its state holds what the lifespan loaded
        self.route = route  # the FastAPI route of POST /recommend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in (self.route.path, scope.get("root_path", "") + self.route.path)
        ):
            await self.app(scope, receive, send)
            return
        messages, raw = await _read_body(receive)
        plain = self._plain(scope, raw) if messages[-1]["type"] == "http.request" else None
        metrics: Metrics = self.service.state.metrics
        with metrics.writing():
            metrics.fast_lane.labels("handed_on" if plain is None else "answered").inc()
        if plain is None:
            await self.app(scope, replaying(messages, receive), send)
            return
        scope["route"] = self.route  # as routing would set it, for the metrics' endpoint label
        model, entry = plain
        state = self.service.state
        try:
            response = await run_recommend(
                state.batcher,
                state.store,
                state.settings,
                model,
                [entry],
                lambda results: recommend_json(model, entry, results[0]),
                receive,
            )
        except Exception as exc:
            response = await self._error_response(scope, exc)
        await response(scope, receive, send)

    def _plain(self, scope: Scope, raw: bytes) -> tuple[LoadedModel, RecommendRequest] | None:
        """(model, entry) when the route would go on to read the history and queue the entry;
        None for anything the route has to refuse or see (it then answers as it always did)."""
        if not raw or len(raw) > INLINE_BODY_BYTES:
            return None
        if not sends_json(_header(scope, b"content-type")):
            return None
        if (_header(scope, b"content-encoding") or "").strip().lower() not in ("", "identity"):
            return None  # the route's 415, even for a body that happens to read as JSON
        try:
            # orjson reads fewer documents than json.loads (no NaN or 1e400, no BOM, no lone
            # surrogates, no integers past 64 bits) and reads the ones it accepts to the same
            # values, so a body it refuses goes to the route, which reads it as it always has.
            entry = validate_recommend(orjson.loads(raw), self.service.state.settings)
        except (orjson.JSONDecodeError, RequestValidationError):
            return None
        state = self.service.state
        if entry.user_id is not None:
            try:
                DataAccess(state.api_key_digests, _header(scope, b"x-api-key")).require()
            except Unauthorized:
                return None
        if limit_errors(entry, state.settings, ("body",)):
            return None
        if not state.registry.loaded:
            return None
        return state.registry.model, entry

    async def _error_response(self, scope: Scope, exc: Exception) -> Response:
        """What the app's exception handlers answer for exc (e.g. 503 while shutting down), as
        they would for the route: the lane runs outside Starlette's exception middleware."""
        handlers = self.service.exception_handlers
        for cls in type(exc).__mro__:
            if cls in handlers:
                return await handlers[cls](Request(scope), exc)
        raise exc


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of header `name` (lower case), as Starlette's request.headers.get."""
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), None)


async def _read_body(receive: Receive) -> tuple[list[Message], bytes]:
    """Every message up to the end of the body (or a disconnect), and the body's bytes."""
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
    return messages, b"".join(m.get("body", b"") for m in messages)
