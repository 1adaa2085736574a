"""Telling an outage of RabbitMQ or Redis from a fault of our own.

Services do not import the broker's or the store's client libraries, so their errors are told by
the module that defines them: a connection or timeout error, a message the broker cannot route,
an error raised by the AMQP client (its class, or where it was raised), or by the Redis client's
connection layer. A service that meets one waits and tries again; anything else is a bug and is
raised.
"""

from __future__ import annotations

from common.transport.port import Unroutable

_AMQP_CLIENTS = ("aiormq", "aio_pika", "pamqp")
_REDIS_CONNECTION = ("ConnectionError", "TimeoutError")  # redis.exceptions (BusyLoadingError is one)


class Unavailable(Exception):
    """The broker or the store could not be reached for this operation."""


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


class Backoff:
    """Waits between tries during an outage: ``first_s`` doubling up to ``cap_s``; ``reset``
    after a success."""

    def __init__(self, first_s: float = 0.2, cap_s: float = 5.0) -> None:
        self.first_s, self.cap_s = first_s, cap_s
        self.failures = 0

    def next_s(self) -> float:
        delay = min(self.first_s * 2.0**self.failures, self.cap_s)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0
