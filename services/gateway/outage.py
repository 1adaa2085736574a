"""The gateway during a broker or store outage: 503 with ``Retry-After``, never a 500.

``is_outage`` (``common.transport.errors``) tells a failure to reach RabbitMQ or Redis from a fault
of the gateway itself. ``AnswerOutages`` turns such an error, raised by any route before its
response started, into a 503 in the OpenAI error shape.
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.transport.errors import is_outage, what_failed
from services.front import openai_api as oa

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # a broker or store that did not answer: try again this much later (clients reconnect each second)


def unavailable_response(exc: BaseException) -> JSONResponse:
    return JSONResponse(
        oa.unavailable(f"Service unavailable: {what_failed(exc)} did not answer ({type(exc).__name__}); retry later"),
        503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class AnswerOutages:
    """ASGI middleware: a broker or store failure that escapes a route is a 503 with
    ``Retry-After`` (if the response has not started; a stream that started just ends)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("%s %s: %s: %s", scope.get("method"), scope.get("path"), type(exc).__name__, exc)
            if not started:
                await unavailable_response(exc)(scope, receive, send)
