"""Request bodies bounded before anything parses them.

``BoundBodies`` (ASGI middleware) reads a request's body itself, at most ``max_bytes`` of it and
within ``timeout_s``, before any route sees it:

- a ``Content-Length`` over the cap is a 413 at once: not a byte of the body is read, and the
  connection closes after the answer;
- a body sent without a length (chunked) is a 413 as soon as what arrived passes the cap;
- a body that has not arrived whole within ``timeout_s`` is a 408 (a client that sends it byte
  by byte holds nothing for longer).

What passes is handed to the route as one message, so it is held once, and never more than the
cap. Routes that parse an upload as it streams in (``exempt``: multipart ``/v1/files``, with a
limit of its own) get the body as it comes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.front import openai_api as oa


class TooLarge(Exception):
    pass


def header(scope: Scope, name: bytes) -> bytes | None:
    """A request header's value (the first, if repeated); None when absent."""
    return next((value for key, value in scope.get("headers", ()) if key == name), None)


def too_large(max_bytes: int) -> JSONResponse:
    return JSONResponse(
        oa.error_body(
            f"The request body is larger than the {max_bytes} bytes this server accepts (max_body_bytes)",
            code="request_too_large",
        ),
        413,
        headers={"Connection": "close"},
    )


def too_slow(timeout_s: float) -> JSONResponse:
    return JSONResponse(
        oa.error_body(
            f"The request body did not arrive within {timeout_s:g} s (body_timeout_s)", code="request_timeout"
        ),
        408,
        headers={"Connection": "close"},
    )


class BoundBodies:
    """ASGI middleware: each request's body read whole, within ``max_bytes`` and ``timeout_s``,
    before the app runs (see the module's docstring)."""

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, timeout_s: float, exempt: Callable[[Scope], bool] = lambda scope: False
    ) -> None:
        self.app, self.max_bytes, self.timeout_s, self.exempt = app, max_bytes, timeout_s, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.exempt(scope):
            return await self.app(scope, receive, send)
        length = header(scope, b"content-length")
        if length is None and header(scope, b"transfer-encoding") is None:
            return await self.app(scope, receive, send)  # no body
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_large(self.max_bytes)(scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except TooLarge:
            return await too_large(self.max_bytes)(scope, receive, send)
        except TimeoutError:
            return await too_slow(self.timeout_s)(scope, receive, send)
        if body is not None:  # None: the client left before it finished sending
            await self.app(scope, replayed(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                raise TooLarge
            if not message.get("more_body", False):
                return bytes(body)


def replayed(body: bytes, receive: Receive) -> Receive:
    """``receive`` that gives ``body`` first, whole, then what the server sends (a disconnect)."""
    given = False

    async def receiving() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receiving
