"""FastAPI app: recommendations, events, health, metrics and hot reload.

Build it with `create_app(settings)`; uvicorn uses `service.app:create_app` as a factory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import multiprocessing
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from remi_core.bundle import BundleError
from remi_core.threads import ThreadSettingError, setup_threads
from service import openapi
from service.auth import AccessDep, key_digest, require_data_access
from service.batcher import MicroBatcher
from service.body import (
    MAX_LISTED_ERRORS,
    BatchBody,
    DecodedBody,
    EventsBody,
    RecommendBody,
    limit_errors,
    request_body,
)
from service.errors import (
    AdminDisabled,
    RedisUnavailable,
    ReloadFailed,
    ServiceError,
    Unauthorized,
)
from service.history import Event, HistoryStore
from service.metrics import Metrics, shared_across_workers
from service.middleware import AnswerCancelledRequests, BodyLimitMiddleware
from service.recommend import RecommendFastLane, run_recommend
from service.recommender import LoadedModel
from service.registry import ModelRegistry
from service.responses import batch_json, recommend_json
from service.schemas import (
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    EventsRequest,
    EventsResponse,
    ReadinessResponse,
    RecommendRequest,
    RecommendResponse,
    ReloadResponse,
)
from service.settings import Settings

log = logging.getLogger(__name__)


# New tracked objects (net) before the garbage collector's youngest generation is collected.
GC_GEN0_THRESHOLD = 50_000
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class StartupError(RuntimeError):
    """The service cannot start (e.g. the bundle is missing or corrupt)."""


# --- dependencies -------------------------------------------------------------------------------
# All `async def`, even those that do not await: FastAPI runs a plain `def` dependency in its
# thread pool, a thread hop per dependency per request (about a tenth of the event loop's time
# per request under load, issue 11).


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_model(request: Request) -> LoadedModel:
    # Resolved once per request: the request keeps this model even if a reload swaps it.
    return request.app.state.registry.model


async def get_store(request: Request) -> HistoryStore:
    return request.app.state.store


async def get_batcher(request: Request) -> MicroBatcher:
    return request.app.state.batcher


async def require_admin(
    settings: Annotated[Settings, Depends(get_settings)],
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    if settings.admin_token is None:
        raise AdminDisabled("admin endpoints are disabled: set REMI_ADMIN_TOKEN to enable them")
    scheme, _, token = (authorization or "").partition(" ")
    # RFC 9110: one or more spaces after the scheme; blanks around a header value are not part
    # of it, though httptools (what remi-serve runs) keeps trailing ones.
    token = token.strip(" \t")
    expected = settings.admin_token.get_secret_value()
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), expected.encode()):
        msg = "missing or wrong admin token (send 'Authorization: Bearer <token>')"
        raise Unauthorized(msg, 'Bearer realm="remi-admin"')


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
ModelDep = Annotated[LoadedModel, Depends(get_model)]
StoreDep = Annotated[HistoryStore, Depends(get_store)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]


# --- helpers ------------------------------------------------------------------------------------


# --- routes -------------------------------------------------------------------------------------

router = APIRouter()
# The GET routes also answer HEAD (the same status and headers, no body: uvicorn drops it), which
# load balancers' health checks and uptime monitors may use. Out of the schema: FastAPI would give
# the two methods of one handler the same operation id.
RETRY_AFTER = {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
CHALLENGE_HEADER = {"description": "How to authenticate.", "schema": {"type": "string"}}
# Every route that takes a JSON body.
ERRORS: dict[int | str, dict[str, Any]] = {
    408: {
        "model": ErrorResponse,
        "description": "Nothing more of the body arrived for REMI_BODY_TIMEOUT_S; the "
        "connection is closed.",
    },
    413: {
        "model": ErrorResponse,
        "description": "The body is over REMI_MAX_BODY_BYTES; refused before it is read in full.",
    },
    415: {
        "model": ErrorResponse,
        "description": "The body is compressed (Content-Encoding): send it uncompressed.",
    },
    422: {
        "model": ErrorResponse,
        "description": "Invalid request: a field breaks a rule or a limit, or the body is not "
        "UTF-8 JSON sent with Content-Type: application/json (message in `detail`).",
    },
}
# Routes that touch Redis (for /recommend*, only entries given by user_id do).
STORE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    401: {
        "model": ErrorResponse,
        "description": "Missing or wrong X-API-Key, only when API keys are configured "
        "(REMI_API_KEYS); /recommend* need it only for entries given by user_id.",
        "headers": {"WWW-Authenticate": CHALLENGE_HEADER},
    },
    409: {
        "model": ErrorResponse,
        "description": "A Redis key involved holds the wrong type (named in `detail`); "
        "nothing was written. Not worth retrying until the key is fixed.",
    },
    503: {
        "model": ErrorResponse,
        "description": "Redis is unavailable (or no model is loaded yet); retry after Retry-After. "
        "For POST /events, nothing was stored unless `detail` says it cannot tell.",
        "headers": {"Retry-After": RETRY_AFTER},
    },
}
NOT_LOADED: dict[int | str, dict[str, Any]] = {
    503: {
        "model": ErrorResponse,
        "description": "No model is loaded (starting or stopping).",
        "headers": {"Retry-After": RETRY_AFTER},
    }
}
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorResponse,
        "description": "Missing or wrong admin bearer token.",
        "headers": {"WWW-Authenticate": CHALLENGE_HEADER},
    },
    403: {"model": ErrorResponse, "description": "Admin is off: REMI_ADMIN_TOKEN is not set."},
    409: {
        "model": ErrorResponse,
        "description": "The bundle `current` points at was rejected; the old one keeps serving.",
    },
    # The body limits hold for every route (BodyLimitMiddleware).
    408: ERRORS[408],
    413: ERRORS[413],
    422: ERRORS[422],
}


@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz",
    response_model=ReadinessResponse,
    responses={
        503: {
            "model": ReadinessResponse,
            "description": "No model is loaded yet, or the batcher stopped.",
        }
    },
    tags=["ops"],
)
async def readyz(registry: RegistryDep, store: StoreDep, batcher: BatcherDep) -> JSONResponse:
    """Readiness: a model is loaded and the batcher runs. Redis is reported but does not make
    the service unready, since requests with a history in the body work without it."""
    redis_error = await store.ping()
    ready = registry.loaded and batcher.running
    body = {
        "ready": ready,
        "model_version": registry.model.version if registry.loaded else None,
        "worker_pid": os.getpid(),  # which worker answered (several under --workers N)
        "redis": {"ok": redis_error is None, "error": redis_error},
        "reload": {
            "ok": registry.last_error is None,
            "error": registry.last_error,
            "rejected_target": registry.failed_target,
            "last_check_at": registry.last_check_at,
        },
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.head("/v1/model", include_in_schema=False)
@router.get("/v1/model", responses=NOT_LOADED, tags=["ops"])
async def model_manifest(model: ModelDep, batcher: BatcherDep) -> dict[str, Any]:
    """The served bundle's manifest (its "index" section holds the measured recall and the
    search parameters in use), plus where the index lives, what answers searches (and where: the
    CPU, a faiss GPU index, or the encoder's CUDA device for the dense search) and how many
    batches this worker computes at once (REMI_COMPUTE_THREADS) and how long a batch its event
    loop may compute itself (REMI_BATCH_INLINE_MS; 0 on workers with more than one CPU)."""
    return {
        **model.manifest,
        "index_device": model.index_device,
        "search_backend": model.search_backend,
        "search_device": model.search_device,
        "batches_at_once": batcher.batches_at_once(model),
        "batch_inline_ms": batcher.inline_s * 1000,
    }


@router.head("/metrics", include_in_schema=False)
@router.get("/metrics", response_class=PlainTextResponse, tags=["ops"])
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    """Prometheus metrics, in Prometheus's text format."""
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/recommend",
    response_model=RecommendResponse,
    responses=STORE_ERRORS,
    tags=["recommend"],
    openapi_extra=request_body(RecommendRequest),
)
async def recommend(
    _: DecodedBody,
    model: ModelDep,
    settings: SettingsDep,
    store: StoreDep,
    access: AccessDep,
    batcher: BatcherDep,
    body: RecommendBody,
    request: Request,
) -> Response:
    """Top-n items for one user (history in the body, or a stored user's history)."""
    if body.user_id is not None:
        access.require()
    if errors := limit_errors(body, settings, ("body",)):
        raise RequestValidationError(errors)
    return await run_recommend(
        batcher,
        store,
        settings,
        model,
        [body],
        lambda results: recommend_json(model, body, results[0]),
        request.receive,
    )


@router.post(
    "/recommend/batch",
    response_model=BatchResponse,
    responses=STORE_ERRORS,
    tags=["recommend"],
    openapi_extra=request_body(BatchRequest),
)
async def recommend_many(
    _: DecodedBody,
    model: ModelDep,
    settings: SettingsDep,
    store: StoreDep,
    access: AccessDep,
    batcher: BatcherDep,
    body: BatchBody,
    request: Request,
) -> Response:
    """Many users in one encode and one search; each entry means what POST /recommend means."""
    if any(entry.user_id is not None for entry in body.requests):
        access.require()
    errors = [
        error
        for i, entry in enumerate(body.requests)
        for error in limit_errors(entry, settings, ("body", "requests", i))
    ]
    if errors:
        raise RequestValidationError(errors)
    render = partial(batch_json, model, body.requests)
    return await run_recommend(
        batcher, store, settings, model, body.requests, render, request.receive
    )


@router.post(
    "/events",
    response_model=EventsResponse,
    responses=STORE_ERRORS,
    # The key before the body: a client without one is refused before its body is decoded.
    dependencies=[Depends(require_data_access)],
    tags=["events"],
    openapi_extra=request_body(EventsRequest),
)
async def post_events(
    _: DecodedBody, store: StoreDep, metrics: MetricsDep, body: EventsBody
) -> EventsResponse:
    """Append interactions to the users' capped histories and to the nightly job's stream."""
    await store.append([Event(e.user_id, e.item_id, e.timestamp) for e in body.events])
    metrics.events.inc(len(body.events))
    return EventsResponse(stored=len(body.events))


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    dependencies=[Depends(require_admin)],
    responses=ADMIN_ERRORS,
    tags=["admin"],
)
async def admin_reload(registry: RegistryDep) -> ReloadResponse:
    """Load the bundle `current` points at now, if it is not the one serving."""
    outcome = await registry.reload(force=True)
    if outcome.error is not None:
        what = f"bundle {outcome.target} rejected" if outcome.target else "nothing to load"
        raise ReloadFailed(f"{what}, still serving {outcome.version}: {outcome.error}")
    return ReloadResponse(
        reloaded=outcome.reloaded,
        version=outcome.version,
        previous=outcome.previous,
        current_target=outcome.target,
    )


# --- errors: the one place where domain errors become HTTP ---------------------------------------


# A key of the body longer than this is cut where errors name it: an unknown key of 8 MiB was
# sent back three times (detail, loc, field), a 25 MB answer.
MAX_NAMED_KEY = 100


def _named(part: Any) -> Any:
    if isinstance(part, str) and len(part) > MAX_NAMED_KEY:
        return f"{part[:MAX_NAMED_KEY]}... ({len(part)} characters)"
    return part


def _validation_summary(errors: Sequence[Any]) -> tuple[str, list[dict[str, Any]]]:
    clean = []
    for err in errors:
        full = [_named(p) for p in err.get("loc", ())]
        loc = [p for p in full if p != "body"]
        clean.append({"type": err.get("type"), "loc": full, "msg": err["msg"]})
        if err.get("type") == "json_invalid":
            # Here loc holds the character offset of the syntax error, not a field name.
            at = f" (at character {loc[0]})" if loc else ""
            reason = (err.get("ctx") or {}).get("error") or err["msg"]  # e.g. "Expecting ','"
            clean[-1]["msg"] = f"request body is not valid JSON{at}: {reason}"
            clean[-1]["field"] = None
            continue
        if err.get("type") == "string_pattern_mismatch":  # ids: the one pattern (NOT_BLANK)
            clean[-1]["msg"] = "String should have a character that is not whitespace"
        if not loc and err.get("type") == "missing":
            clean[-1]["msg"] = "request body is missing: send a JSON object"
        if not loc and isinstance(err.get("input"), bytes):
            # FastAPI hands the raw bytes on when the Content-Type is not JSON.
            clean[-1]["type"] = "json_invalid"
            clean[-1]["msg"] = NOT_JSON
        where = ".".join(str(p) for p in loc)
        clean[-1]["field"] = where or None
    parts = [f"{c['field']}: {c['msg']}" if c["field"] else c["msg"] for c in clean]
    return "; ".join(parts), clean


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    every = exc.errors()
    listed = every[:MAX_LISTED_ERRORS]
    detail, errors = _validation_summary(listed)
    total = getattr(exc, "total", len(every))  # BodyErrors cut its list and counted the rest
    if total > len(listed):
        detail += f"; and {total - len(listed)} more errors (the first {len(listed)} listed)"
    return JSONResponse({"detail": detail, "errors": errors}, status_code=422)


NOT_JSON = "request body must be a JSON object sent with Content-Type: application/json"


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own errors (404, 405, unparseable bodies) in our error shape."""
    if exc.status_code == 400 and isinstance(exc.__cause__, ValueError):
        # FastAPI's "There was an error parsing the body": bytes that are not UTF-8 (or UTF-16/32
        # JSON). A body that is not JSON is a 422 like any other body problem.
        msg = f"request body is not valid JSON: {exc.__cause__}"
        error = {"type": "json_invalid", "loc": ["body"], "msg": msg, "field": None}
        return JSONResponse({"detail": msg, "errors": [error]}, status_code=422)
    headers = exc.headers
    if exc.status_code == 405:
        # Starlette names the methods of the first route on the path; a GET route's HEAD is a
        # route of its own here (see `router`), and a 405's Allow must list both (RFC 9110).
        headers = {**(headers or {}), "Allow": ", ".join(_methods_of(request))}
    return JSONResponse(
        {"detail": str(exc.detail), "errors": None}, status_code=exc.status_code, headers=headers
    )


HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _methods_of(request: Request) -> list[str]:
    """Every method some route answers on the request's path: each asked of the routes, as the
    router would (FastAPI nests included routers, so routes' own method sets are not at hand)."""
    return [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.router.routes
        )
    ]


async def _on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
    if isinstance(exc, RedisUnavailable):
        request.app.state.metrics.redis_errors.inc()
    headers = None
    if exc.status_code == 503:
        headers = {"Retry-After": "1"}
    elif isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": exc.challenge}
    body = {"detail": exc.message, "errors": None}
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Logged with its traceback here; the client only learns that it was our fault.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "internal server error", "errors": None}, status_code=500)


# --- metrics middleware -------------------------------------------------------------------------


class MetricsMiddleware:
    """Counts and times every request per route template (never per raw path: unbounded)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the API's routes, for requests answered before routing

    def endpoint(self, scope: Scope) -> str:
        """The route template that answered, or that the path matches when a middleware answered
        before routing (the body limit's 408 and 413): counted under "unmatched", those never
        reached a dashboard of their route."""
        route = scope.get("route")
        if getattr(route, "path", None) is None:  # none, or a router (FastAPI's docs routes)
            route = next((r for r in self.routes if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", None) or "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None
        counted = False
        start = time.perf_counter()

        def count(code: int) -> None:
            nonlocal counted
            counted = True
            endpoint = self.endpoint(scope)
            with self.metrics.writing():
                self.metrics.requests.labels(endpoint, scope["method"], str(code)).inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # Counted before the last byte goes out: a client that scrapes /metrics once it
                # has its answer finds it counted, whichever worker answers the scrape.
                count(status or 500)
            await send(message)

        failed = True
        try:
            await self.app(scope, receive, send_wrapper)
            failed = False
        finally:
            if not counted:
                # No answer: an error, or the client went away before its request was whole
                # (499, as nginx counts it), which is not the server's failure. An answer cut
                # off mid-body counts with the status it started with.
                count(status or (500 if failed else 499))


# --- app ----------------------------------------------------------------------------------------


def _stop_with_the_supervisor() -> None:
    """Have the kernel send this worker SIGTERM when its parent, the supervisor of `remi-serve
    --workers N`, dies, even by SIGKILL: else the workers would keep serving unsupervised (none
    restarted) and keep the port, so a new `remi-serve` could not start. Linux only; a no-op in
    a process that is not a multiprocessing child (one worker, tests)."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        log.warning("cannot ask to stop with the supervisor: errno %d", ctypes.get_errno())
        return
    if os.getppid() != parent.pid:  # it died before the request above: nothing will come
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    _stop_with_the_supervisor()
    # This thread's pools get REMI_TORCH_THREADS (0: the worker's share of the CPUs,
    # REMI_THREADS). In the compute threads torch uses REMI_TORCH_THREADS and faiss's index
    # search REMI_THREADS, OpenMP's count for new threads. Wider torch pools spin against each
    # other and against the event loop on small hosts (docs/serving.md).
    pool = settings.torch_threads or None
    try:
        cpus = setup_threads(torch_threads=pool, faiss_threads=pool).threads
    except ThreadSettingError as exc:
        raise StartupError(str(exc)) from None
    # The compute thread runs Python too (batch assembly, response rendering); the loop thread
    # waits for the GIL up to one switch interval each time it wakes. 5 ms (the default) made
    # /healthz p99 exceed 20 ms beside the heaviest batches; 0.5 ms cut the loop's lag p99
    # there by a fifth against 1 ms, at the same req/s for small requests (docs/serving.md).
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    # The garbage collector runs in whichever thread allocates, holding the GIL. With the default
    # first threshold (700 live new objects), rendering a batch of 256 users with n=1000 started
    # a collection every ~700 item dicts, each walking the ~2M references of the batch's young
    # lists (histories, result columns): 15-20 ms each, many per request. A higher threshold
    # leaves collections for the garbage of many requests, not every few hundred items.
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_GEN0_THRESHOLD), gen1, gen2)
    registry = ModelRegistry(
        settings.bundle_root,
        settings.device,
        settings.verify_checksums,
        app.state.metrics,
        exact_search=settings.exact_search,
    )
    try:
        model = await anyio.to_thread.run_sync(registry.load_initial)
    except (BundleError, OSError) as exc:
        log.error("cannot start: no usable bundle under %s: %s", settings.bundle_root, exc)
        raise StartupError(f"no usable bundle under {settings.bundle_root}: {exc}") from None
    log.info(
        "serving bundle %s (%d items, K=%d, search %s on %s)",
        model.version,
        model.num_items,
        model.num_interests,
        model.search_backend,
        model.search_device,
    )
    try:
        store = HistoryStore(
            settings.redis_url,
            settings.redis_timeout_s,
            settings.history_cap,
            settings.stream_maxlen,
            settings.redis_max_connections,
        )
    except ValueError as exc:  # the message has the password hidden
        log.error("cannot start: %s", exc)
        raise StartupError(str(exc)) from None
    redis_error = await store.ping()
    if redis_error:
        # Not fatal: history-in-body requests work, and the client reconnects when Redis is up.
        log.warning("redis is not reachable at start-up: %s", redis_error)
    app.state.registry = registry
    app.state.store = store
    metrics: Metrics = app.state.metrics
    threads, parallel = _compute_threads(settings, cpus)
    # With more CPUs the compute threads run beside the loop; on one, they only take turns.
    inline_ms = settings.batch_inline_ms if cpus == 1 and threads == 1 else 0.0
    app.state.batcher = MicroBatcher(
        settings.batch_wait_ms,
        settings.batch_max_users,
        on_batch=metrics.record_batch,
        workers=threads,
        balance_ms=settings.batch_balance_ms,
        parallel=parallel,
        inline_ms=inline_ms,
    )
    app.state.batcher.start()
    log.info("compute threads: %d, this bundle's batches %d at a time, on the loop up to %g ms",
             threads, app.state.batcher.batches_at_once(model), inline_ms)  # fmt: skip
    # The registry owns the model from here: a local kept across the `yield` would hold the
    # first model (its table, its index) in memory for the worker's whole life after a reload.
    del model
    background = []
    if settings.reload_interval_s > 0:
        background.append(asyncio.create_task(registry.poll(settings.reload_interval_s)))
    if shared_across_workers():  # one worker's gauges are rewritten at each scrape anyway
        background.append(asyncio.create_task(app.state.metrics.keep_gauges_current()))
    try:
        yield
    finally:
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await app.state.batcher.aclose()
        await store.close()
        metrics.close()


def _compute_threads(settings: Settings, cpus: int) -> tuple[int, Callable[[LoadedModel], int]]:
    """(compute threads, how many batches of a model run at once) for REMI_COMPUTE_THREADS on a
    worker with `cpus` CPUs. Chosen per model, so a reload that changes the search backend
    changes it too. Measured at 100k items on 2 cores: two compute threads served 16 clients
    1.13-1.30x and 64 clients 1.34-1.45x the requests/s of one; at 1M items (IVF) one served
    more (docs/serving.md, docs/benchmarks.md)."""
    if settings.compute_threads:
        fixed = settings.compute_threads
        return fixed, lambda model: fixed
    side_by_side = max(1, cpus // (settings.torch_threads or cpus))
    return side_by_side, lambda model: side_by_side if model.batches_side_by_side else 1


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; nothing is loaded until the lifespan starts (uvicorn or TestClient)."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    settings = settings or Settings()
    app = FastAPI(
        title="REMI retrieval service",
        summary="Multi-interest candidate retrieval over a versioned REMI bundle.",
        version="0.1.0",
        lifespan=lifespan,
        # /recommend/ is not /recommend: a 404, not a 307 whose Location (built from the Host
        # header, always http://) would send a client behind a TLS proxy to plain HTTP.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.metrics = Metrics(settings.coverage_window_s)
    app.state.api_key_digests = frozenset(key_digest(key) for key in settings.api_key_list())
    app.include_router(router)
    openapi.install(app, settings)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(ServiceError, _on_service_error)
    app.add_exception_handler(Exception, _on_unexpected)
    if settings.fast_lane:
        route = next(r for r in router.routes if getattr(r, "endpoint", None) is recommend)
        app.add_middleware(RecommendFastLane, service=app, route=route)  # inside the two below
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    app.add_middleware(AnswerCancelledRequests)
    # Added last, so outermost: refused bodies are counted too.
    # The app's list holds the API's routes behind one included router, which names no
    # template: its own plain routes (/docs, /openapi.json) and the API's, each by its template.
    routes = [r for r in app.router.routes if isinstance(r, Route)] + router.routes
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, routes=routes)
    return app
