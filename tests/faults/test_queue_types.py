"""Classic and quorum work queues on a RabbitMQ node of the test's own (free loopback ports, never
the shared 5672): each type is declared as configured, a consumer holds at most its prefetch and
follows a resize (a quorum queue takes no channel-wide prefetch), a quorum queue's own delivery
limit dead-letters a message that keeps coming back, a queue of the other type is a clear error,
and a mesh on quorum queues answers every request once, also when a worker is killed."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable

import pytest

from common.config import MeshConfig
from common.names import Names
from common.transport.connect import LocalHub, open_bus
from common.transport.rabbit import BROKER_DELIVERY_LIMIT_FACTOR, TopologyMismatch
from services.bench import faults
from tests.brokers import need

pytestmark = pytest.mark.faults
TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def services():
    need(faults.available() is None, f"private RabbitMQ/Redis: {faults.available()}")
    private = faults.PrivateServices()
    try:
        private.start()
        yield private
    finally:
        private.close()


def config(services: faults.PrivateServices, queue_type: str, **more) -> MeshConfig:
    return MeshConfig(namespace=f"qt{secrets.token_hex(4)}", amqp_url=services.amqp_url, queue_type=queue_type, **more)


def listed(services: faults.PrivateServices, queue: str, *fields: str) -> list[str]:
    out = services.ctl("list_queues", "name", *fields, "--no-table-headers", "--quiet").stdout
    rows = [line.split("\t") for line in out.splitlines()]
    return next(row[1:] for row in rows if row[0] == queue)


async def until(condition: Callable[[], bool], event: asyncio.Event) -> None:
    """Wait (bounded) until ``condition`` holds; ``event`` is set at each change."""

    async def wait() -> None:
        while not condition():
            event.clear()
            await event.wait()

    await asyncio.wait_for(wait(), TIMEOUT_S)


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_durable_queues_have_the_configured_type(services, queue_type):
    cfg = config(services, queue_type)
    names = Names(cfg.namespace)
    bus = await open_bus(cfg, names, LocalHub())
    try:
        await bus.declare_queue(names.encode_queue)
        await bus.declare_queue(names.events_queue("gw"), exclusive=True)
        for queue in (names.encode_queue, names.dead_queue):
            kind, arguments = await asyncio.to_thread(listed, services, queue, "type", "arguments")
            assert kind == queue_type, (queue, kind, arguments)
            limit = cfg.delivery_limit * BROKER_DELIVERY_LIMIT_FACTOR
            assert (f'"x-delivery-limit",{limit}' in arguments.replace(" ", "")) == (queue_type == "quorum")
        assert (await asyncio.to_thread(listed, services, names.events_queue("gw"), "type"))[0] == "classic"
    finally:
        await bus.delete(queues=[names.encode_queue, names.dead_queue], exchanges=[names.dead_exchange])
        await bus.close()


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_consumer_holds_at_most_its_prefetch_and_follows_a_resize(services, queue_type):
    cfg = config(services, queue_type)
    names = Names(cfg.namespace)
    bus = await open_bus(cfg, names, LocalHub())
    queue = names.encode_queue
    held, changed = [], asyncio.Event()

    async def pump(subscription) -> None:
        async for delivery in subscription:
            held.append(delivery)
            changed.set()

    acked = [0]

    async def unacked() -> int:
        """What the broker has handed out and not had back (a quorum queue's own count in
        ``list_queues`` lags by seconds; its depth, asked by a passive declare, does not)."""
        await asyncio.to_thread(services.ctl, "list_queues", "name")  # a second for a broker that would send more
        return 40 - acked[0] - await bus.queue_depth(queue)

    async def ack(n: int) -> None:
        for _ in range(n):
            await held.pop(0).ack()
            acked[0] += 1

    try:
        await bus.declare_queue(queue)
        for i in range(40):
            await bus.publish(queue, str(i).encode())
        subscription = await bus.consume(queue, prefetch=3)
        task = asyncio.create_task(pump(subscription))
        await until(lambda: len(held) == 3, changed)
        assert await unacked() == 3
        await subscription.set_prefetch(5)  # more room: two more come
        await until(lambda: len(held) == 5, changed)
        assert await unacked() == 5
        await subscription.set_prefetch(2)  # less: nothing new until fewer than 2 are held
        await ack(3)
        assert await unacked() == 2 and len(held) == 2
        await ack(1)  # one held: one more comes
        await until(lambda: len(held) == 2, changed)
        await ack(1)  # the last one taken before the resize settled: the limit is 2 again
        await until(lambda: len(held) == 2, changed)
        assert await unacked() == 2
        await ack(2)
        await until(lambda: len(held) == 2, changed)
        assert await unacked() == 2 and acked[0] == 7
        await subscription.cancel()
        await asyncio.wait_for(task, TIMEOUT_S)
    finally:
        await bus.delete(queues=[queue, names.dead_queue], exchanges=[names.dead_exchange])
        await bus.close()


async def test_a_quorum_queue_dead_letters_what_keeps_coming_back(services):
    """Without the counter's store a redelivery counts as attempt 2, so the counted limit never
    ends a message whose consumers keep dying; the quorum queue's own limit does."""
    cfg = config(services, "quorum")
    names = Names(cfg.namespace)
    producer = await open_bus(cfg, names, LocalHub())
    try:
        await producer.declare_queue(names.encode_queue)
        await producer.publish(names.encode_queue, b"kills its consumer")
        limit = cfg.delivery_limit * BROKER_DELIVERY_LIMIT_FACTOR
        for _ in range(limit + 1):
            dying = await open_bus(cfg, names, LocalHub())
            delivery = await asyncio.wait_for(
                anext(aiter(await dying.consume(names.encode_queue, prefetch=1))), TIMEOUT_S
            )
            assert delivery.body == b"kills its consumer"
            await dying.close()  # dies holding it: back to the queue, one delivery more
        dead = await producer.consume(names.dead_queue, prefetch=1)
        message = await asyncio.wait_for(anext(aiter(dead)), TIMEOUT_S)
        assert message.body == b"kills its consumer"
        assert message.headers.get("x-exegpt-reason") == "broker: delivery_limit"
        assert message.headers.get("x-exegpt-queue") == names.encode_queue
        await message.ack()
        assert await producer.queue_depth(names.encode_queue) == 0
    finally:
        await producer.delete(queues=[names.encode_queue, names.dead_queue], exchanges=[names.dead_exchange])
        await producer.close()


async def test_a_queue_of_the_other_type_is_a_clear_error(services):
    classic = config(services, "classic")
    names = Names(classic.namespace)
    bus = await open_bus(classic, names, LocalHub())
    try:
        await bus.declare_queue(names.encode_queue)
        with pytest.raises(TopologyMismatch, match="cannot change its type"):
            await open_bus(classic.model_copy(update={"queue_type": "quorum"}), names, LocalHub())
    finally:
        await bus.delete(queues=[names.encode_queue, names.dead_queue], exchanges=[names.dead_exchange])
        await bus.close()


def test_a_mesh_on_quorum_queues_answers_each_request_once_when_a_worker_dies(services):
    mesh = faults.Mesh(services, workers=2, env={"EXEGPT_QUEUE_TYPE": "quorum"})
    try:
        mesh.start()
        assert asyncio.run(asyncio.to_thread(listed, services, Names(mesh.namespace).encode_queue, "type")) == [
            "quorum"
        ]
        harness = faults.Harness(
            services, mesh, faults.Settings(clients=4, baseline_s=5.0, observe_s=20.0, recovered_share=0.8)
        )
        asyncio.run(harness.prepare())
        outcome = asyncio.run(harness.run("kill-worker"))
        assert outcome.sent >= 10, outcome
        assert outcome.goals_met() == [], (outcome.goals_met(), outcome)
    finally:
        mesh.close()
