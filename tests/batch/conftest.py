"""Fixtures of the batch tests: a unique namespace, the in-memory or the real bus and store."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

import pytest

from common.config import MeshConfig
from common.transport.connect import LocalHub, open_bus, open_store
from common.transport.port import Bus, Store
from services.batch.names import BatchNames

AMQP_URL = os.environ.get("EXEGPT_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("EXEGPT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def broker_available() -> bool:
    return _port_open(5672) and _port_open(6379)


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["memory", pytest.param("broker", marks=pytest.mark.broker)])
def transport_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "broker" and not broker_available():
        pytest.skip("RabbitMQ/Redis not answering on 127.0.0.1 (run deploy/ensure-services.sh)")
    return request.param


@pytest.fixture
def batch_config(transport_kind: str, namespace: str) -> MeshConfig:
    urls = {"amqp_url": AMQP_URL, "redis_url": REDIS_URL} if transport_kind == "broker" else {}
    return MeshConfig(namespace=namespace, **urls)


@dataclass
class Env:
    config: MeshConfig
    names: BatchNames
    hub: LocalHub
    store: Store
    buses: list[Bus]

    async def bus(self) -> Bus:
        """A new connection (one per simulated process)."""
        bus = await open_bus(self.config, self.names, self.hub)
        self.buses.append(bus)
        return bus


@pytest.fixture
async def env(batch_config: MeshConfig):
    names = BatchNames(batch_config.namespace)
    hub = LocalHub()
    store = await open_store(batch_config) or hub.store
    e = Env(batch_config, names, hub, store, [])
    try:
        yield e
    finally:
        cleanup = await e.bus()
        await cleanup.delete(queues=[names.jobs_queue, names.dead_queue, names.encode_queue,
                                     names.handoff_queue, names.reply_queue("test")],
                             exchanges=[names.dead_exchange, names.control_exchange,
                                        names.status_exchange])
        for bus in e.buses:
            await bus.close()
        await store.delete_prefix(names.key_prefix)
        if store is not hub.store:
            await store.close()
