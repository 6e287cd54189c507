"""ASGI middleware that guards the app before any route runs."""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.history import UNKNOWN_OUTCOME, WRITE_IN_FLIGHT


def replaying(held: list[Message], receive: Receive) -> Receive:
    """A receive that gives the messages already read (`held`, consumed as it goes) first, then
    whatever comes next (e.g. a disconnect) as usual: for middleware that read a body before
    handing the request on."""

    async def replay() -> Message:
        return held.pop(0) if held else await receive()

    return replay


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` with 413, without reading them in full, and with
    408 a body of which nothing more arrived for `timeout_s` (nginx's client_body_timeout: a
    slow upload that keeps sending is not cut off).

    A declared Content-Length over the limit is refused before a byte of the body is read;
    otherwise (chunked bodies, or a client sending more than it declared) the bytes are counted
    as they arrive and the request is refused as soon as the count passes the limit. A body
    within the limit is held here and handed on unchanged: the JSON routes read it whole anyway.
    Without the deadline a client that stops sending mid-body held its connection for good
    (uvicorn has no read timeout), and enough of them exhaust the worker's file descriptors.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, f"request body of {int(declared)} bytes is")
            return
        held: list[Message] = []
        size = 0
        while True:
            try:
                async with asyncio.timeout(self.timeout_s):
                    message = await receive()
            except TimeoutError:
                detail = (
                    f"no more of the request body arrived for {self.timeout_s:g} s "
                    f"(REMI_BODY_TIMEOUT_S; {size} bytes received)"
                )
                await send_error_and_close(send, 408, detail)
                return
            if message["type"] != "http.request":
                return  # the client went away while sending: nobody to answer
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(send, "request body is")
                return
            held.append(message)
            if not message.get("more_body", False):
                break

        await self.app(scope, replaying(held, receive), send)

    async def _refuse(self, send: Send, what: str) -> None:
        detail = (
            f"{what} over the limit of {self.max_bytes} bytes (REMI_MAX_BODY_BYTES); "
            "send fewer or shorter entries"
        )
        # The rest of the body is never read, so the connection cannot be reused.
        await send_error_and_close(send, 413, detail)


class AnswerCancelledRequests:
    """A request still open when uvicorn's graceful shutdown runs out (REMI_GRACEFUL_SHUTDOWN_S)
    is cancelled; uvicorn would log the cancellation as an error with its traceback and answer
    500. It gets a 503 that says what happened instead (when no answer has started yet)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except asyncio.CancelledError:
            if started:
                raise
            # An /events script sent with no reply yet may have run: a retry could store twice.
            then = UNKNOWN_OUTCOME if WRITE_IN_FLIGHT.get() else "send the request again"
            await send_error_and_close(
                send, 503, f"the service is shutting down; {then}", retry_after=1
            )


async def send_error_and_close(
    send: Send, status: int, detail: str, retry_after: int | None = None
) -> None:
    """An answer in the service's error shape, closing the connection after it."""
    body = json.dumps({"detail": detail, "errors": None}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
