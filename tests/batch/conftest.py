"""Fixtures of the batch tests: a unique namespace, the in-memory or the real bus and store."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from common.config import MeshConfig
from common.names import Names
from common.transport.batchdir import BatchDir
from common.transport.connect import LocalHub, open_bus, open_store
from common.transport.port import Bus, Store
from tests.brokers import AMQP_URL, REDIS_URL


@pytest.fixture
def batch_config(transport_kind: str, namespace: str) -> MeshConfig:
    urls = {"amqp_url": AMQP_URL, "redis_url": REDIS_URL} if transport_kind == "broker" else {}
    return MeshConfig(namespace=namespace, **urls)


@dataclass
class Env:
    config: MeshConfig
    names: Names
    hub: LocalHub
    store: Store
    data: BatchDir
    buses: list[Bus]

    async def bus(self) -> Bus:
        """A new connection (one per simulated process)."""
        bus = await open_bus(self.config, self.names, self.hub)
        self.buses.append(bus)
        return bus


@pytest.fixture
async def env(batch_config: MeshConfig):
    names = Names(batch_config.namespace)
    hub = LocalHub()
    store = await open_store(batch_config) or hub.store
    e = Env(batch_config, names, hub, store, BatchDir(batch_config.batch_dir, batch_config.namespace), [])
    try:
        yield e
    finally:
        cleanup = await e.bus()
        await cleanup.delete(
            queues=[
                names.jobs_queue,
                names.dead_queue,
                names.encode_queue,
                names.handoff_queue,
                names.reply_queue("test"),
            ],
            exchanges=[names.dead_exchange, names.control_exchange, names.status_exchange],
        )
        for bus in e.buses:
            await bus.close()
        await store.delete_prefix(names.key_prefix)
        if store is not hub.store:
            await store.close()


async def run_jobs(app, count: int, timeout_s: float = 30.0) -> None:
    """Run ``count`` queued jobs of a gateway app with the echo executor, then stop."""
    import asyncio

    from services.batch.consumer import ConsumerConfig, JobConsumer
    from services.batch.executor import EchoExecutor

    gw = app.state.gateway
    done, seen = asyncio.Event(), []
    consumer = JobConsumer(
        gw.bus,
        app.state.batches.data,
        Names(app.state.config.namespace),
        EchoExecutor(),
        ConsumerConfig("test"),
        on_handled=lambda r, _: (seen.append(r), len(seen) >= count and done.set()),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await asyncio.wait_for(done.wait(), timeout_s)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout_s)
