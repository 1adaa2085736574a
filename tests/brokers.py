"""The real RabbitMQ and Redis the `broker` tests use: loopback addresses, and what to do without them.

Outside CI a missing broker skips those tests (a laptop without RabbitMQ can still run the rest);
under CI (``CI`` set) it fails them, so a green run always means the broker cases ran.
"""

from __future__ import annotations

import os
import socket

import pytest

AMQP_URL = os.environ.get("EXEGPT_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("EXEGPT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def broker_available() -> bool:
    return _port_open(5672) and _port_open(6379)


def require_broker() -> None:
    """Skip (or, under CI, fail) the calling test when RabbitMQ or Redis does not answer."""
    if broker_available():
        return
    message = "RabbitMQ/Redis not answering on 127.0.0.1 (run deploy/ensure-services.sh)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
