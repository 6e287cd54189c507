"""Request and response bodies. Static rules live here; limits from settings are in body.py.

Request models are strict: a JSON value of another type than the schema's is refused, never
coerced (pydantic's lax mode would take `"explain": 0` or `"n": "5"`), so the OpenAPI schema
states exactly what is accepted.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Annotated

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from remi_core.diversity import MAX_DIVERSITY
from remi_core.redis_keys import EARLIEST_TIMESTAMP, latest_timestamp

# The longest id (item or user) a request may carry.
MAX_ID_LENGTH = 256
# Ids are opaque strings; the pattern (searched, not anchored) rejects empty and all-blank ids.
# Not a bare "\S": clients check it with ECMAScript's \s (OpenAPI's regex dialect), which counts
# U+FEFF as blank and U+0085 not, the server with Unicode's White_Space, which does the
# opposite, and Python clients (hypothesis, schemathesis) with re's, which adds U+001C-U+001F;
# excluding all of them here gives one set of blanks in the three dialects.
NOT_BLANK = "[^\\s\x1c-\x1f\u0085\ufeff]"
Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=NOT_BLANK)]
# History entries may be anything string-like: ids the catalogue lacks are reported, not refused.
HistoryItem = Annotated[str, StringConstraints(max_length=MAX_ID_LENGTH)]
# A response names at most this many unknown ids per user, so a history of unknown ids cannot
# blow the response up (unknown_count still gives the total).
UNKNOWN_IDS_SHOWN = 100
_FLOAT_MAX = sys.float_info.max


def _integral_number(value: object) -> object:
    """5.0 as 5: JSON Schema's "integer" (what OpenAPI publishes) is any number without a
    fraction, so a client may send either; strict validation then refuses every other type."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


class RecommendRequest(BaseModel):
    # The rule of _history_xor_user_id, for the schema: exactly one of the two is given (a null
    # counts as not given).
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["history"],
                    "properties": {"history": {"type": "array"}, "user_id": {"type": "null"}},
                },
                {
                    "required": ["user_id"],
                    "properties": {"user_id": {"type": "string"}, "history": {"type": "null"}},
                },
            ]
        },
    )

    history: list[HistoryItem] | None = Field(
        None, description="Item ids the user interacted with, oldest first."
    )
    user_id: Id | None = Field(
        None, description="Use this user's stored history (from POST /events) instead."
    )
    n: Annotated[int, BeforeValidator(_integral_number)] = Field(
        50, ge=1, description="How many items to return (at most REMI_MAX_N)."
    )
    exclude_history: bool = Field(True, description="Never return items from the history.")
    explain: bool = Field(
        False, description="Also return the interest vectors and their routing weights."
    )
    diversity: float = Field(
        0.0,
        ge=0,
        le=MAX_DIVERSITY,
        allow_inf_nan=False,
        description="lambda of ComiRec's diverse aggregation: 0 is the plain top n (Eq. 7); "
        "larger values trade score for items of different categories (the bundle's, else the "
        "producing interest).",
    )

    @model_validator(mode="after")
    def _history_xor_user(self) -> RecommendRequest:
        if (self.history is None) == (self.user_id is None):
            # A custom error type keeps pydantic's "Value error, " prefix out of the message.
            raise PydanticCustomError(
                "history_xor_user_id", "Give exactly one of `history` or `user_id`"
            )
        return self


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    requests: list[RecommendRequest] = Field(
        ..., min_length=1, description="One entry per user, each like a POST /recommend body."
    )


class RecommendedItemOut(BaseModel):
    item_id: str
    score: float | None = Field(
        description="max over interests of <interest, item embedding>; null for fallback items."
    )
    interest: int | None = Field(
        description="Index of the interest that produced the score; null for fallback items."
    )


class RoutingWeight(BaseModel):
    position: int = Field(description="Position in the encoded window, oldest first.")
    item_id: str
    weight: float


class InterestOut(BaseModel):
    interest: int
    vector: list[float]
    routing: list[RoutingWeight] | None = Field(
        description="How much each encoded history item contributes to this interest (sums to "
        "1); null for models without a routing matrix (single-interest youtube-dnn, gru4rec)."
    )


class ExplanationOut(BaseModel):
    window: list[str] = Field(description="The encoded items: the last seq_len known ones.")
    interests: list[InterestOut]


class RecommendResponse(BaseModel):
    model_version: str
    user_id: str | None = None
    fallback: bool = Field(
        description="True when no known history item was left and the most popular items answer."
    )
    items: list[RecommendedItemOut]
    unknown_ids: list[str] = Field(
        max_length=UNKNOWN_IDS_SHOWN,
        description=f"History ids not in the served catalogue, in first-seen order; only the "
        f"first {UNKNOWN_IDS_SHOWN} (see unknown_count).",
    )
    unknown_count: int = Field(description="How many distinct history ids are unknown.")
    known_history_length: int = Field(description="Known history items (before windowing).")
    explain: ExplanationOut | None = None


class BatchResponse(BaseModel):
    model_version: str
    results: list[RecommendResponse]


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: Id
    item_id: Id = Field(description="Any id: items new to the catalogue enter it at retraining.")
    timestamp: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=EARLIEST_TIMESTAMP)] = (
        Field(
            description="Unix time in seconds (a JSON number), from 2000-01-01T00:00:00Z to "
            "before the end of tomorrow (UTC, by the server's clock)."
        )
    )

    @field_validator("timestamp", mode="before")
    @classmethod
    def _saturate_huge_integers(cls, ts: object) -> object:
        # A JSON integer beyond a float's range would get pydantic's "Input should be a valid
        # number", which hides why; as the largest float it gets the range check's message.
        if type(ts) is int and abs(ts) > _FLOAT_MAX:
            return _FLOAT_MAX if ts > 0 else -_FLOAT_MAX
        return ts

    @field_validator("timestamp")
    @classmethod
    def _not_in_the_future(cls, ts: float) -> float:
        # A far-future time would sort after every real event for good (the nightly job orders
        # by time); the bound leaves 24 to 48 hours for clients' clock skew.
        if ts >= (bound := latest_timestamp()):
            when = datetime.fromtimestamp(bound, UTC).isoformat().replace("+00:00", "Z")
            raise PydanticCustomError(
                "timestamp_in_future",
                "Timestamp should be before {bound} ({when}: the end of tomorrow, UTC)",
                {"bound": bound, "when": when},
            )
        return ts


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    events: list[EventIn] = Field(..., min_length=1)


class EventsResponse(BaseModel):
    stored: int


class ReloadResponse(BaseModel):
    reloaded: bool
    version: str | None
    previous: str | None
    current_target: str | None


class ErrorItem(BaseModel):
    type: str = Field(description="pydantic's error type, or e.g. json_invalid, too_long.")
    loc: list[str | int] = Field(description="Where in the request, e.g. [body, requests, 0, n].")
    msg: str
    field: str | None = Field(description="`loc` without `body`, dotted; null for the body.")


class ErrorResponse(BaseModel):
    """Every error answer: `detail` says what is wrong; `errors` lists each problem (422)."""

    detail: str
    errors: list[ErrorItem] | None = None


class RedisStatus(BaseModel):
    ok: bool
    error: str | None = Field(description="Why Redis did not answer (password hidden).")


class ReloadStatus(BaseModel):
    ok: bool = Field(description="False while the latest bundle load failed.")
    error: str | None
    rejected_target: str | None = Field(description="The version `current` named that failed.")
    last_check_at: float | None = Field(description="When `current` was last checked (unix).")


class ReadinessResponse(BaseModel):
    ready: bool = Field(description="A model is loaded (Redis does not count: see `redis`).")
    model_version: str | None
    worker_pid: int = Field(description="The worker process that answered (--workers N).")
    redis: RedisStatus
    reload: ReloadStatus
