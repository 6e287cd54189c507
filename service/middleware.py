"""ASGI middleware that guards the app before any route runs."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def replaying(held: list[Message], receive: Receive) -> Receive:
    """A receive that gives the messages already read (`held`, consumed as it goes) first, then
    whatever comes next (e.g. a disconnect) as usual: for middleware that read a body before
    handing the request on."""

    async def replay() -> Message:
        return held.pop(0) if held else await receive()

    return replay


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` with 413, without reading them in full.

    A declared Content-Length over the limit is refused before a byte of the body is read;
    otherwise (chunked bodies, or a client sending more than it declared) the bytes are counted
    as they arrive and the request is refused as soon as the count passes the limit. A body
    within the limit is held here and handed on unchanged: the JSON routes read it whole anyway.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

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
            message = await receive()
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
        body = json.dumps({"detail": detail, "errors": None}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    # The rest of the body is never read, so the connection cannot be reused.
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
