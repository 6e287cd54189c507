"""The recommend routes' JSON bodies, decoded and validated in a worker thread, in small steps.

FastAPI would decode (json.loads) and validate (pydantic) a body on the event loop, in one piece
each: for the largest legal batch (REMI_MAX_BATCH entries of REMI_MAX_HISTORY ids, megabytes)
that held the GIL for tens of ms and stalled every other request, /healthz included. Here a
body over INLINE_BODY_BYTES goes to a worker thread, which decodes a batch entry by entry and
validates it entry by entry, so the loop waits at most one entry's worth (plus the GIL switch
interval) whenever it wants the GIL back. Smaller bodies, the common case, are handled on the
loop: they take well under a millisecond, less than the thread hops would add.

The answers are FastAPI's own: the same values, and the same errors (type, loc, msg) for bodies
that are not JSON, not UTF-8, sent with another Content-Type, empty, or invalid. Whatever its
shape, a body is decoded in scanner calls over bounded windows of its text (`decode_json`).
"""

from __future__ import annotations

import email.message
import functools
import json
import json.decoder
import json.scanner
import sys
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from service import openapi
from service.schemas import BatchRequest, EventsRequest, RecommendRequest
from service.settings import Settings

M = TypeVar("M", bound=BaseModel)
_DECODER = json.JSONDecoder()
_SCAN = json.scanner.make_scanner(_DECODER)  # the C scanner json.loads uses, one value per call
_WHITESPACE = json.decoder.WHITESPACE.match  # JSON's whitespace, [ \t\n\r]*
_NUMBER_START = frozenset("-0123456789")
# Bodies up to this size are decoded and validated on the loop: well under a millisecond, less
# than the two hops to a worker thread would cost every ordinary request.
INLINE_BODY_BYTES = 64 * 1024
# A valid entry standing in for the real ones when the rest of a batch body is validated.
_PLACEHOLDER_ENTRY = {"history": []}
# Errors listed in one 422: a 0.5 MB batch of wrong ids has 256,000, which listed in full made
# a 50 MB answer, built on the event loop.
MAX_LISTED_ERRORS = 20


class BodyErrors(RequestValidationError):
    """The first MAX_LISTED_ERRORS errors of a body, and how many it had in all."""

    def __init__(self, errors: list[dict[str, Any]], total: int | None = None) -> None:
        super().__init__(errors[:MAX_LISTED_ERRORS])
        self.total = len(errors) if total is None else total


# Containers up to this many characters are decoded by one scanner call (C, holding the GIL
# for well under a millisecond): the routes' bodies and their batch entries, whole. Larger
# ones are decoded element by element, each element again whole if it fits.
MAX_WINDOW = 64 * 1024
MIN_WINDOW = 1024
# Runs of array elements decoded together, for lists too long for a window (see _run).
RUN = 16 * 1024
# Deeper than this, a container too large for one call is refused as nested too deeply (a
# RecursionError, as json.loads raises past the interpreter's limit): the routes' bodies nest
# three deep, and each level here is a Python call.
MAX_DEPTH = 64
# Python 3.13's decoder names a comma before a closing bracket; earlier ones expect a value.
_TRAILING_COMMA_ERRORS = sys.version_info >= (3, 13)


def _skip(s: str, i: int) -> int:
    # Most often no whitespace at all: one test, not a regex call.
    return i if s[i : i + 1] not in " \t\n\r" else _WHITESPACE(s, i).end()


def _scalar(s: str, i: int) -> tuple[Any, int]:
    """The value at s[i] (no whitespace before it) in one scanner call: a string, number or
    constant, or a container `_Pieces._whole` takes in one piece."""
    try:
        return _SCAN(s, i)
    except StopIteration as stop:
        raise json.JSONDecodeError("Expecting value", s, stop.value) from None
    except json.JSONDecodeError:
        raise
    except ValueError:
        # int() refused a number's digits (sys.get_int_max_str_digits(), 4,300): json.loads
        # raises that as is, without a position and telling the caller to raise the limit.
        # Inside a container the element-by-element decoding finds the number itself.
        if s[i : i + 1] in _NUMBER_START:
            most = sys.get_int_max_str_digits()
            raise json.JSONDecodeError(f"Integer with more than {most} digits", s, i) from None
        raise


def _next(s: str, i: int, close: str, what: str) -> tuple[bool, int]:
    """After an array element or object member: (True, the index past `close`) at the end of
    the container, else (False, the index of the next one)."""
    i = _skip(s, i)
    if s.startswith(close, i):
        return True, i + 1
    if not s.startswith(",", i):
        raise json.JSONDecodeError("Expecting ',' delimiter", s, i)
    if _TRAILING_COMMA_ERRORS and s.startswith(close, _skip(s, i + 1)):
        raise json.JSONDecodeError(f"Illegal trailing comma before end of {what}", s, i)
    return False, _skip(s, i + 1)


class _Pieces:
    """One body's decoding: containers that fit a window in one scanner call, larger ones
    element by element, with json.decoder's errors at json.decoder's positions."""

    def __init__(self, s: str) -> None:
        self.s = s
        self.window = MIN_WINDOW  # twice the last container decoded whole: entries are alike
        self.spent = 0  # characters scanned by windows a container did not fit
        self.run_spent = 0  # characters scanned by runs of elements that did not decode

    def value(self, i: int, depth: int) -> tuple[Any, int]:
        """The value at s[i] (no whitespace before it) and the index after it."""
        s = self.s
        if not s.startswith(("[", "{"), i):
            return _scalar(s, i)
        if (whole := self._whole(i)) is not None:
            return whole
        if depth >= MAX_DEPTH:
            raise RecursionError("arrays or objects are nested too deeply")
        return self._array(i, depth + 1) if s[i] == "[" else self._object(i, depth + 1)

    def _whole(self, i: int) -> tuple[Any, int] | None:
        """The container at s[i] in one scanner call, or None if it does not fit a window.

        Within MAX_WINDOW of the end the window is the rest of the text, scanned in place: a
        failure there is the body's own, raised as json raises it. Further in, a window cut
        from the text is scanned: a container's end is its closing bracket, so one that fits
        decodes as in the whole; a syntax error well before the cut is the body's own too (an
        unterminated string is reported where it starts, so it may be the cut's). Windows that
        fail cost at most the body's length in all, then containers go element by element."""
        s, rest = self.s, len(self.s) - i
        if rest <= MAX_WINDOW:
            try:
                return _scalar(s, i)
            except json.JSONDecodeError:
                raise
            except ValueError:  # a number too long for int() inside: see `_scalar`
                return None
        width = self.window
        while self.spent < len(s):
            try:
                value, end = _SCAN(s[i : i + width], 0)
            except StopIteration as stop:  # where a value was expected, nested ones too
                msg, at = "Expecting value", stop.value
            except json.JSONDecodeError as exc:
                msg, at = exc.msg, exc.pos
            except ValueError:  # an integer past 4,300 digits, perhaps cut: scanned in place
                msg, at = "", width
            else:
                self.window = min(max(MIN_WINDOW, 2 * end), MAX_WINDOW)
                return value, i + end
            if at < width - 16 and not msg.startswith("Unterminated string"):
                raise json.JSONDecodeError(msg, s, i + at)
            self.spent += width
            if width == MAX_WINDOW:
                return None
            width = min(4 * width, MAX_WINDOW)
        return None

    def _array(self, i: int, depth: int) -> tuple[list[Any], int]:
        s, items = self.s, []
        i = _skip(s, i + 1)
        if s.startswith("]", i):
            return items, i + 1
        while True:
            if not s.startswith(("[", "{"), i) and (run := self._run(i)) is not None:
                items += run[0]
                i = run[1]  # at the comma after the run
            else:
                item, i = self.value(i, depth)
                items.append(item)
            done, i = _next(s, i, "]", "array")
            if done:
                return items, i

    def _run(self, i: int) -> tuple[list[Any], int] | None:
        """The elements from s[i] (a scalar: containers take windows) to the last comma within
        RUN characters, in one scanner call (a long list of ids, element by element, cost ten
        times json.loads), or None. Wrapped in brackets they decode only if that comma is
        between elements: one inside a string or a nested container leaves it open."""
        s = self.s
        if self.run_spent >= len(s) or len(s) - i <= RUN:
            return None
        cut = s.rfind(",", i, i + RUN)
        if cut <= i:
            return None
        text = f"[{s[i:cut]}]"
        try:
            items, end = _SCAN(text, 0)
        except (StopIteration, ValueError, RecursionError):
            items, end = None, 0
        if items is None or end != len(text):
            self.run_spent += cut - i  # failed runs cost at most the body's length
            return None
        return items, cut

    def _object(self, i: int, depth: int) -> tuple[dict[str, Any], int]:
        s = self.s
        value: dict[str, Any] = {}  # assignment: a repeated key keeps its first place, last value
        i = _skip(s, i + 1)
        if s.startswith("}", i):
            return value, i + 1
        while True:
            if not s.startswith('"', i):
                msg = "Expecting property name enclosed in double quotes"
                raise json.JSONDecodeError(msg, s, i)
            key, i = json.decoder.scanstring(s, i + 1, True)
            i = _skip(s, i)
            if not s.startswith(":", i):
                raise json.JSONDecodeError("Expecting ':' delimiter", s, i)
            value[key], i = self.value(_skip(s, i + 1), depth)
            done, i = _next(s, i, "}", "object")
            if done:
                return value, i


def decode_json(raw: bytes) -> Any:
    """What json.loads(raw) returns or raises (the same value; the same error at the same
    position), in scanner calls over at most MAX_WINDOW characters each (but for one long
    string), so that a large body never holds the GIL for long, whatever its shape: before,
    a body off the expected shape (a top-level array, UTF-16, one huge batch entry, a syntax
    error at the end) went to json.loads in one piece and stalled the event loop 0.2-0.35 s
    per 13 MiB. A container larger than MAX_WINDOW nested past MAX_DEPTH raises
    RecursionError (json.loads: past the interpreter's recursion limit). An integer longer than
    Python converts (sys.get_int_max_str_digits(), 4,300) is a JSONDecodeError at its start
    (json.loads: a ValueError, without a position, telling the caller to raise that limit)."""
    try:
        s = raw.decode(json.detect_encoding(raw), "surrogatepass")  # as json.loads decodes
    except UnicodeDecodeError:
        return json.loads(raw)  # its own error, for bytes that are no text
    value, i = _Pieces(s).value(_skip(s, 0), 0)
    if (i := _skip(s, i)) != len(s):
        raise json.JSONDecodeError("Extra data", s, i)
    return value


def _errors(exc: ValidationError, prefix: tuple[Any, ...]) -> list[dict[str, Any]]:
    # As FastAPI reports them: no URL, loc under "body".
    return [{**error, "loc": (*prefix, *error["loc"])} for error in exc.errors(include_url=False)]


def _validate(model: type[M], value: Any, prefix: tuple[Any, ...]) -> tuple[M | None, list]:
    try:
        # from_attributes, as FastAPI validates bodies.
        return model.model_validate(value, from_attributes=True), []
    except ValidationError as exc:
        return None, _errors(exc, prefix)


def _longer(value: Any, key: str, most: int) -> int | None:
    """How many items value[key] has when it is a list of more than `most`, else None."""
    items = value.get(key) if isinstance(value, dict) else None
    return len(items) if isinstance(items, list) and len(items) > most else None


def _history_too_long(count: int, settings: Settings, loc: tuple[Any, ...]) -> dict[str, Any]:
    msg = f"History should have at most {settings.max_history} items, not {count}"
    return limit_error("too_long", (*loc, "history"), msg)


# The list limits (REMI_MAX_HISTORY, REMI_MAX_BATCH, REMI_MAX_EVENTS) are checked on the decoded
# body, before pydantic sees it: a 4 MiB list of a million wrong items (`"history": [1, 1, ...]`,
# `"events": [{}, {}, ...]`) cost seconds of CPU and gigabytes for a million errors, and needs
# no key on the recommend routes. Within the limits the errors are pydantic's, as FastAPI's.


def validate_batch(value: Any, settings: Settings) -> BatchRequest:
    """`BatchRequest.model_validate(value)`, one entry at a time; the same errors, in the same
    order (the entries' first, then the rest of the body's)."""
    entries = value.get("requests") if isinstance(value, dict) else None
    if not isinstance(entries, list) or not entries:
        return _validated_whole(BatchRequest, value)
    if len(entries) > settings.max_batch:
        msg = f"A batch should have at most {settings.max_batch} entries, not {len(entries)}"
        raise BodyErrors([limit_error("too_long", ("body", "requests"), msg)])
    valid, errors, total = [], [], 0
    for i, entry in enumerate(entries):
        loc = ("body", "requests", i)
        if (count := _longer(entry, "history", settings.max_history)) is not None:
            checked, entry_errors = None, [_history_too_long(count, settings, loc)]
        else:
            checked, entry_errors = _validate(RecommendRequest, entry, loc)
        valid.append(checked)
        errors += entry_errors[: MAX_LISTED_ERRORS - len(errors)]
        total += len(entry_errors)
    # The rest of the body (unknown keys), with a valid stand-in for the entries.
    rest_errors = _validate(BatchRequest, {**value, "requests": [_PLACEHOLDER_ENTRY]}, ("body",))[1]
    if errors or rest_errors:
        raise BodyErrors(errors + rest_errors, total + len(rest_errors))
    return BatchRequest.model_construct(requests=valid)


def _validated_whole(model: type[M], value: Any) -> M:
    checked, errors = _validate(model, value, ("body",))
    if errors:
        raise BodyErrors(errors)  # cut here, in the thread that validated a large body
    assert checked is not None
    return checked


def validate_recommend(value: Any, settings: Settings) -> RecommendRequest:
    if (count := _longer(value, "history", settings.max_history)) is not None:
        raise BodyErrors([_history_too_long(count, settings, ("body",))])
    return _validated_whole(RecommendRequest, value)


def validate_events(value: Any, settings: Settings) -> EventsRequest:
    if (count := _longer(value, "events", settings.max_events)) is not None:
        msg = f"Should have at most {settings.max_events} events per request, not {count}"
        raise BodyErrors([limit_error("too_long", ("body", "events"), msg)])
    return _validated_whole(EventsRequest, value)


def limit_error(kind: str, loc: tuple[Any, ...], msg: str) -> dict[str, Any]:
    """A limit from settings, in the shape of pydantic's errors so one handler and one response
    format cover both."""
    return {"type": kind, "loc": loc, "msg": msg}


def limit_errors(entry: RecommendRequest, settings: Settings, loc: tuple[Any, ...]) -> list[dict]:
    """REMI_MAX_N on a validated entry (the list limits were checked before it was validated)."""
    if "n" not in entry.model_fields_set:
        entry.n = openapi.default_n(settings)  # a low REMI_MAX_N lowers the default too
    if entry.n > settings.max_n:
        msg = f"Input should be less than or equal to {settings.max_n}"
        return [limit_error("less_than_equal", (*loc, "n"), msg)]
    return []


@functools.lru_cache(maxsize=64)  # clients send the same few content types, parsed once each
def sends_json(content_type: str | None) -> bool:
    # FastAPI's rule (strict_content_type): application/json or application/*+json, nothing else.
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


_MISSING = object()


def _decoded_entries(value: Any) -> list[Any]:
    entries = value.get("requests") if isinstance(value, dict) else None
    return entries if isinstance(entries, list) else []


def _empty_histories(histories: list[Any]) -> None:
    """Frees a batch's history ids one entry per step. Dropped at once, its 256,000 strings
    would be freed in one go, holding the GIL for over 10 ms wherever the last reference went:
    at the end of the request on the loop, or wherever the garbage collector next ran."""
    for history in histories:
        if isinstance(history, list):
            history.clear()


async def _release(histories: list[Any], body_bytes: int) -> None:
    if body_bytes > INLINE_BODY_BYTES and len(histories) > 1:
        await anyio.to_thread.run_sync(_empty_histories, histories)


async def decoded_body(request: Request) -> AsyncIterator[Any]:
    """The body as FastAPI hands it to validation: decoded JSON, the raw bytes when it is not
    sent as JSON, or _MISSING when empty. Errors as FastAPI raises them."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        msg = f"Content-Encoding {encoding!r} is not supported: send the body uncompressed"
        raise HTTPException(415, msg)
    try:
        raw = await request.body()
        if not raw:
            value = _MISSING
        elif not sends_json(request.headers.get("content-type")):
            value = raw
        elif len(raw) <= INLINE_BODY_BYTES:
            value = decode_json(raw)
        else:
            value = await anyio.to_thread.run_sync(decode_json, raw)
    except RecursionError:  # arrays or objects nested past the decoder's recursion limit
        msg = "arrays or objects are nested too deeply"
        error = {"type": "json_invalid", "loc": ("body",), "msg": msg, "input": {}}
        raise RequestValidationError([error]) from None
    except json.JSONDecodeError as exc:
        error = {
            "type": "json_invalid",
            "loc": ("body", exc.pos),
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": exc.msg},
        }
        raise RequestValidationError([error], body=exc.doc) from exc
    except HTTPException:
        raise
    except Exception as exc:  # FastAPI's answer to bytes json.loads cannot read (not UTF-8)
        raise HTTPException(400, "There was an error parsing the body") from exc
    try:
        yield value
    finally:
        entries = _decoded_entries(value)
        histories = [e.get("history") for e in entries if isinstance(e, dict)]
        await _release(histories, len(await request.body()))


def _validated(validate: Callable[[Any, Settings], M]) -> Callable[..., Any]:
    async def dependency(
        request: Request, value: Annotated[Any, Depends(decoded_body)]
    ) -> AsyncIterator[M]:
        if value is _MISSING:
            missing = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
            raise RequestValidationError([missing])
        size = len(await request.body())  # cached by Starlette: read once per request
        settings = request.app.state.settings
        if size <= INLINE_BODY_BYTES:
            model = validate(value, settings)
        else:
            model = await anyio.to_thread.run_sync(validate, value, settings)
        try:
            yield model
        finally:
            if isinstance(model, BatchRequest):
                await _release([entry.history for entry in model.requests], size)

    return dependency


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody FastAPI writes for a `body: model` parameter."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"content": {"application/json": {"schema": schema}}, "required": True}}


# Routes take both: DecodedBody first (decoding errors come before other dependencies' errors,
# as with FastAPI's body), the validated model last (validation errors after them).
DecodedBody = Annotated[Any, Depends(decoded_body)]
RecommendBody = Annotated[RecommendRequest, Depends(_validated(validate_recommend))]
BatchBody = Annotated[BatchRequest, Depends(_validated(validate_batch))]
EventsBody = Annotated[EventsRequest, Depends(_validated(validate_events))]
