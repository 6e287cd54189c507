"""The OpenAPI schema, completed with what the routes check against settings.

Static rules live in the pydantic models (schemas.py); the limits an operator sets (REMI_MAX_*)
and whether API keys are on are written in here, so the schema states exactly what this
server accepts and a client generated from it is refused nothing it was allowed to send.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from remi_core.redis_keys import latest_timestamp
from service.schemas import BatchRequest, EventIn, EventsRequest, RecommendRequest
from service.settings import Settings

# Routes whose API key is needed only for the entries that read a stored history (user_id).
KEY_FOR_USER_ID_ONLY = ("/recommend", "/recommend/batch")


def _array_branch(prop: dict[str, Any]) -> dict[str, Any]:
    """The array schema of a property that may also be null (`anyOf: [array, null]`)."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "array":
            return branch
    raise KeyError("no array in this property's schema")


def apply_settings(schema: dict[str, Any], settings: Settings, keys_on: bool) -> dict[str, Any]:
    """Write the settings-dependent limits and the API key requirement into `schema`."""
    models = schema["components"]["schemas"]
    recommend = models["RecommendRequest"]["properties"]
    recommend["n"]["maximum"] = settings.max_n
    recommend["n"]["default"] = default_n(settings)
    _array_branch(recommend["history"])["maxItems"] = settings.max_history
    models["BatchRequest"]["properties"]["requests"]["maxItems"] = settings.max_batch
    models["EventsRequest"]["properties"]["events"]["maxItems"] = settings.max_events

    for path, operations in schema["paths"].items():
        for operation in operations.values():
            if "security" not in operation:
                continue
            if not keys_on:
                del operation["security"]  # open: nothing to send
            elif path in KEY_FOR_USER_ID_ONLY:
                operation["security"] = [{"ApiKey": []}, {}]  # {}: history-only bodies
    return schema


def add_body_models(schema: dict[str, Any]) -> dict[str, Any]:
    """The routes with JSON bodies read them themselves (service/body.py), so FastAPI does not
    see their models: add them to the components their requestBody refers to."""

    def takes_bodies(batch: BatchRequest, events: EventsRequest) -> None:
        """Only its signature is read: FastAPI's schemas for body parameters of these models."""

    route = APIRoute("/", takes_bodies, methods=["POST"])
    models = get_openapi(title="", version="", routes=[route])["components"]["schemas"]
    schema["components"]["schemas"].update(
        (model.__name__, models[model.__name__])
        for model in (BatchRequest, RecommendRequest, EventsRequest, EventIn)
    )
    return schema


def default_n(settings: Settings) -> int:
    """The `n` of a request that sends none: the model's default, or REMI_MAX_N if lower."""
    return min(RecommendRequest.model_fields["n"].default, settings.max_n)


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the completed schema at /openapi.json (built once, on first request; only the
    timestamp bound, which moves with the clock, is renewed on each request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            keys_on = bool(app.state.api_key_digests)
            app.openapi_schema = apply_settings(add_body_models(schema), settings, keys_on)
        event = app.openapi_schema["components"]["schemas"]["EventIn"]["properties"]
        # Whole days: exact, except for a schema fetched just before midnight (UTC).
        event["timestamp"]["exclusiveMaximum"] = latest_timestamp()
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
