"""The gateway's middleware: one log line per request, and a trace span per request when tracing is on."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.tracing import TRACEPARENT, TRACESTATE, Tracing
from services.gateway.errors import error_message

# the request log keeps the logger name operators filter on (docs/mesh.md)
log = logging.getLogger("services.gateway.app")


class LogRequests:
    """ASGI middleware: one INFO line per finished HTTP request (a stream: once it ended) with its
    method, path, status, duration and what the route left in ``request.state`` (request_id,
    model, prompt_tokens, pending: its completion tokens); a 4xx/5xx also gets a WARNING with the
    error message. No prompt or completion text is logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, state = time.perf_counter(), scope.setdefault("state", {})
        status, body = 500, bytearray()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400 and len(body) < 4096:
                body.extend(message.get("body", b""))
            await send(message)

        error: str | None = None
        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            status, error = 500, f"internal error: {type(exc).__name__}"
            raise
        finally:
            ms = (time.perf_counter() - start) * 1000
            line = f"{scope['method']} {scope['path']} {status} {ms:.1f} ms"
            known = {
                "id": state.get("request_id"),
                "model": state.get("model"),
                "prompt_tokens": state.get("prompt_tokens"),
            }
            if (pending := state.get("pending")) is not None:
                known["completion_tokens"] = pending.next_index
            line += "".join(f" {k}={v}" for k, v in known.items() if v is not None)
            log.info("%s", line)
            if status >= 400:
                log.warning("%s: %s", line, error or error_message(bytes(body)))


class TraceRequests:
    """ASGI middleware (tracing on): a server span per HTTP request, the parent of the spans the
    route makes (the encode work's publish); it joins the client's trace when the request
    carries ``traceparent``. It ends when the response did (a stream: once it ended)."""

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app, self.tracing = app, tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        carried = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in (TRACEPARENT.encode(), TRACESTATE.encode())
        }
        parent = self.tracing.extract(carried) if carried else None
        method, path, status = scope["method"], scope["path"], 500
        state = scope.setdefault("state", {})

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with self.tracing.span(
            f"{method} {path}",
            parent=parent,
            kind="server",
            attributes={"http.request.method": method, "url.path": path},
        ) as span:
            try:
                await self.app(scope, receive, sending)
            finally:
                route = getattr(scope.get("route"), "path", None)
                self.tracing.annotate(
                    span,
                    name=f"{method} {route}" if route else None,
                    error=(f"HTTP {status}" if status >= 500 else None),
                    attributes={
                        "http.response.status_code": status,
                        "http.route": route,
                        "exegpt.request_id": state.get("request_id"),
                    },
                )
