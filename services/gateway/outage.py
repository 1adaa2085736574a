"""The gateway during a broker or store outage: 503 with ``Retry-After``, never a 500.

``is_outage`` tells a failure to reach RabbitMQ or Redis from a fault of the gateway itself: a
connection or timeout error, a message the broker cannot route, or an error raised by the AMQP
client (its class, or where it was raised), or by the Redis client's connection layer. (Services do not import those clients, so
their errors are told by the module that defines them.) ``AnswerOutages`` turns such an error,
raised by any route before its response started, into a 503 in the OpenAI error shape.
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.transport.port import Unroutable
from services.gateway import openai_api as oa

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5  # a broker or store that did not answer: try again this much later
_AMQP_CLIENTS = ("aiormq", "aio_pika", "pamqp")
_REDIS_CONNECTION = ("ConnectionError", "TimeoutError")  # redis.exceptions (BusyLoadingError is one)


class Unavailable(Exception):
    """The gateway could not reach the broker or the store for this request."""


def is_outage(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError, Unroutable, Unavailable)):
        return True
    for cls in type(exc).__mro__:
        package = cls.__module__.split(".", 1)[0]
        if package in _AMQP_CLIENTS or (package == "redis" and cls.__name__ in _REDIS_CONNECTION):
            return True
    return _raised_by_amqp_client(exc)  # e.g. RuntimeError("Connection was not opened")


def _raised_by_amqp_client(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "").split(".", 1)[0] in _AMQP_CLIENTS:
            return True
        tb = tb.tb_next
    return False


def what_failed(exc: BaseException) -> str:
    packages = {cls.__module__.split(".", 1)[0] for cls in type(exc).__mro__}
    if packages & set(_AMQP_CLIENTS) or isinstance(exc, Unroutable) or _raised_by_amqp_client(exc):
        return "the message broker"
    if "redis" in packages:
        return "the store"
    return "the message broker or the store"


def unavailable_response(exc: BaseException) -> JSONResponse:
    return JSONResponse(oa.unavailable(f"Service unavailable: {what_failed(exc)} did not answer "
                                       f"({type(exc).__name__}); retry later"),
                        503, headers={"Retry-After": str(RETRY_AFTER_S)})


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
