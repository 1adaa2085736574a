"""A gateway whose queues the broker lost: not ready meanwhile, queues declared again, its pending
requests published again (each once), on both transports."""

from __future__ import annotations

import asyncio

import pytest

from common.config import MeshConfig
from common.messages import codec
from common.messages.work import EncodeWork, Sampling
from common.names import Names
from common.transport.connect import LocalHub, open_bus, open_transports
from services.front.core import Gateway
from tests.brokers import AMQP_URL, REDIS_URL

pytestmark = pytest.mark.usefixtures("cleanup")
TIMEOUT_S = 10


@pytest.fixture
def mesh_config(transport_kind: str, namespace: str) -> MeshConfig:
    urls = {"amqp_url": AMQP_URL, "redis_url": REDIS_URL} if transport_kind == "broker" else {}
    return MeshConfig(namespace=namespace, topology_check_s=0.2, **urls)


async def queued_ids(bus, queue: str, count: int) -> list[str]:
    """The request ids of the next ``count`` messages of ``queue`` (taken and acked)."""
    subscription = await bus.consume(queue, prefetch=count)
    ids = []
    for _ in range(count):
        delivery = await asyncio.wait_for(anext(aiter(subscription)), TIMEOUT_S)
        ids.append(codec.decode(delivery.body, EncodeWork).request_id)
        await delivery.ack()
    await subscription.cancel()
    return ids


async def test_a_lost_encode_queue_comes_back_with_every_pending_request(mesh_config, hub: LocalHub, transport_kind):
    names = Names(mesh_config.namespace)
    gateway = Gateway(mesh_config, await open_transports(mesh_config, names, hub), "m")
    operator = await open_bus(mesh_config, names, hub)
    await gateway.start()
    try:
        pending = [await gateway.submit([1, 2, 3], Sampling(4)) for _ in range(3)]
        gateway.restored.clear()
        if transport_kind == "broker":
            await operator.delete(queues=[names.encode_queue], exchanges=[])
        else:
            hub.broker.delete_queue(names.encode_queue)
            assert gateway.routable is False  # told at once: /health/ready answers 503
        await asyncio.wait_for(gateway.restored.wait(), TIMEOUT_S)
        assert gateway.routable and await gateway.bus.exists(names.encode_queue)
        ids = await queued_ids(operator, names.encode_queue, 3)
        assert sorted(ids) == sorted(p.request_id for p in pending)  # none lost, none twice
        assert await operator.queue_depth(names.encode_queue) == 0
    finally:
        await operator.close()
        await gateway.close()


async def test_a_gateway_closes_though_a_task_of_its_swallows_the_cancel(mesh_config, hub: LocalHub):
    """Python 3.11's ``asyncio.wait_for`` can swallow a cancel that comes in the same turn of the
    loop as what it waits for (a loss waking the topology keeper as the gateway closes); the
    keeper then loops on. ``close`` cancels again until the task has ended."""
    names = Names(mesh_config.namespace)
    gateway = Gateway(mesh_config, await open_transports(mesh_config, names, hub), "m")
    await gateway.start()
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()  # swallowed, as wait_for can
        await asyncio.sleep(3600)

    gateway._keeper.cancel()
    gateway._keeper = asyncio.create_task(stubborn())
    await asyncio.sleep(0)  # the stubborn task is waiting
    await asyncio.wait_for(gateway.close(), TIMEOUT_S)
    assert swallowed.is_set() and gateway._keeper.done()
