"""The bus and store ports behave the same over RabbitMQ/Redis and in memory."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.names import Names
from common.transport.connect import open_bus, open_store
from common.transport.port import DEADLINE_HEADER, Unroutable, processing

pytestmark = pytest.mark.usefixtures("cleanup")
TIMEOUT_S = 10


async def next_delivery(subscription):
    return await asyncio.wait_for(anext(aiter(subscription)), TIMEOUT_S)


async def test_publish_consume_ack(mesh_config, hub):
    names = Names(mesh_config.namespace)
    bus = await open_bus(mesh_config, names, hub)
    await bus.declare_queue(names.encode_queue)
    await bus.publish(names.encode_queue, b"one")
    sub = await bus.consume(names.encode_queue, prefetch=4)
    delivery = await next_delivery(sub)
    assert (delivery.body, delivery.redelivered) == (b"one", False)
    await delivery.ack()
    assert await bus.queue_depth(names.encode_queue) == 0
    await bus.close()


async def test_unacked_messages_come_back_when_a_consumer_dies(mesh_config, hub):
    names = Names(mesh_config.namespace)
    dying = await open_bus(mesh_config, names, hub)
    await dying.declare_queue(names.encode_queue)
    for body in (b"a", b"b"):
        await dying.publish(names.encode_queue, body)
    sub = await dying.consume(names.encode_queue, prefetch=10)
    got = {(await next_delivery(sub)).body for _ in range(2)}
    assert got == {b"a", b"b"}
    await dying.close()  # never acked

    survivor = await open_bus(mesh_config, names, hub)
    sub2 = await survivor.consume(names.encode_queue, prefetch=10)
    again = [await next_delivery(sub2) for _ in range(2)]
    assert {d.body for d in again} == {b"a", b"b"}
    assert all(d.redelivered for d in again)
    for d in again:
        await d.ack()
    await survivor.close()


async def test_prefetch_bounds_unacked_messages(mesh_config, hub):
    names = Names(mesh_config.namespace)
    bus = await open_bus(mesh_config, names, hub)
    await bus.declare_queue(names.handoff_queue)
    for i in range(3):
        await bus.publish(names.handoff_queue, bytes([i]))
    sub = await bus.consume(names.handoff_queue, prefetch=2)
    first = [await next_delivery(sub) for _ in range(2)]
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(anext(aiter(sub)), 0.3)  # the third waits for credit
    await first[0].ack()
    third = await next_delivery(sub)
    assert third.body == bytes([2])
    await bus.close()


async def test_a_cancelled_consumer_settles_what_it_holds_and_returns_the_rest(mesh_config, hub, transport_kind):
    names = Names(mesh_config.namespace)
    bus = await open_bus(mesh_config, names, hub)
    await bus.declare_queue(names.encode_queue)
    for body in (b"a", b"b", b"c"):
        await bus.publish(names.encode_queue, body)
    sub = await bus.consume(names.encode_queue, prefetch=10)
    held = await next_delivery(sub)
    await sub.cancel()
    if transport_kind == "broker":
        assert not sub._channel.is_closed  # closing now would give `held` back to the queue
    await held.ack()  # a worker changing role finishes what it holds
    if transport_kind == "broker":
        assert sub._channel.is_closed  # and the consumer's channel is released once it has
    again = await bus.consume(names.encode_queue, prefetch=10)
    rest = [await next_delivery(again) for _ in range(2)]
    assert sorted(d.body for d in rest) == sorted({b"a", b"b", b"c"} - {held.body})
    for d in rest:
        await d.ack()
    assert await bus.queue_depth(names.encode_queue) == 0
    await bus.close()


async def test_a_message_failing_delivery_limit_times_goes_to_the_dead_queue(mesh_config, hub):
    names = Names(mesh_config.namespace)
    bus = await open_bus(mesh_config, names, hub)
    await bus.declare_queue(names.encode_queue)
    await bus.publish(names.encode_queue, b"poison")
    sub = await bus.consume(names.encode_queue, prefetch=1)
    for attempt in range(1, mesh_config.delivery_limit + 1):
        delivery = await next_delivery(sub)
        assert delivery.attempts == attempt
        with pytest.raises(RuntimeError):
            async with processing(delivery):
                raise RuntimeError("handler failed")
    dead = await bus.consume(names.dead_queue, prefetch=1)
    buried = await next_delivery(dead)
    assert buried.body == b"poison"
    assert buried.headers["x-exegpt-reason"] == (
        "delivery limit 3 reached; last: handler raised RuntimeError: handler failed"
    )
    assert buried.headers["x-exegpt-queue"] == names.encode_queue
    await bus.close()


async def test_publish_to_a_missing_queue_raises(mesh_config, hub):
    names = Names(mesh_config.namespace)
    bus = await open_bus(mesh_config, names, hub)
    with pytest.raises(Unroutable):
        await bus.publish(names.events_queue("nobody"), b"x")
    await bus.close()


async def test_broadcast_reaches_every_subscriber(mesh_config, hub):
    names = Names(mesh_config.namespace)
    buses = [await open_bus(mesh_config, names, hub) for _ in range(3)]
    subs = [await b.subscribe(names.control_exchange, names.control_queue(f"w{i}")) for i, b in enumerate(buses)]
    await buses[0].broadcast(names.control_exchange, b"v2")
    for sub in subs:
        assert (await next_delivery(sub)).body == b"v2"
    for b in buses:
        await b.close()


async def test_store_ttl_and_set_if_absent(mesh_config, hub):
    store = await open_store(mesh_config) or hub.store
    key = Names(mesh_config.namespace).done("r1")
    assert await store.set_if_absent(key, b"1", ttl_s=30)
    assert not await store.set_if_absent(key, b"2", ttl_s=30)
    assert await store.get(key) == b"1"
    await store.hset(key + "h", {"a": "1"}, ttl_s=30)
    await store.hset(key + "h", {"b": "2"})
    assert await store.hgetall(key + "h") == {"a": "1", "b": "2"}
    await store.set_with_hash(key + "p", b"payload", key + "m", {"n": "7"}, ttl_s=0.2)
    assert await store.get_many(key + "p", key + "missing", key) == [b"payload", None, b"1"]
    assert await store.hgetall(key + "m") == {"n": "7"}
    deadline = time.monotonic() + 10
    while await store.get_many(key + "p") != [None] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # polling the store's own expiry, bounded
    assert await store.get_many(key + "p") == [None] and await store.hgetall(key + "m") == {}
    for i in range(5):
        await store.push_capped(key + "l", bytes([i]), max_len=3)
    assert await store.list_range(key + "l", 10) == [b"\x04", b"\x03", b"\x02"]
    record = {"ttl_s": 30, "list_key": key + "l", "max_len": 3}
    assert await store.set_once_and_record(key + "once", b"1", item=b"\x05", **record)
    assert not await store.set_once_and_record(key + "once", b"2", item=b"\x06", **record)
    assert await store.set_once_and_record(key + "twice", b"1", item=None, **record)
    assert await store.get_many(key + "once", key + "twice") == [b"1", b"1"]
    assert await store.list_range(key + "l", 10) == [b"\x05", b"\x04", b"\x03"]
    await store.close()


async def test_auto_ack_settles_on_delivery(mesh_config, hub):
    names = Names(mesh_config.namespace)
    bus = await open_bus(mesh_config, names, hub)
    queue = names.events_queue("auto")
    await bus.declare_queue(queue, exclusive=True)
    sub = await bus.consume(queue, prefetch=1, auto_ack=True)
    for body in (b"1", b"2", b"3"):
        await bus.publish(queue, body)
    got = [(await next_delivery(sub)).body for _ in range(3)]  # prefetch 1, yet never acked
    assert got == [b"1", b"2", b"3"]
    await bus.close()


async def test_a_consumers_prefetch_can_change_while_it_consumes(mesh_config, hub):
    """Workers resize their intake when a new schedule changes B_D: more prefetch lets more
    messages in at once, less holds back new ones until acks bring the count under it."""
    names = Names(mesh_config.namespace)
    bus = await open_bus(mesh_config, names, hub)
    queue = names.encode_queue
    await bus.declare_queue(queue)
    for i in range(10):
        await bus.publish(queue, b"%d" % i)
    sub = await bus.consume(queue, prefetch=2)
    got = [await asyncio.wait_for(anext(aiter(sub)), 5) for _ in range(2)]
    await sub.set_prefetch(5)
    got += [await asyncio.wait_for(anext(aiter(sub)), 5) for _ in range(3)]
    await sub.set_prefetch(3)
    for delivery in got[:3]:
        await delivery.ack()
    got.append(await asyncio.wait_for(anext(aiter(sub)), 5))  # 2 unacked, room for 1 more
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(aiter(sub)), 0.3)  # the limit holds: nothing more is sent
    assert len(got) == 6
    await bus.close()


async def test_counters_add_and_take_atomically(mesh_config, hub):
    """The WAA credit count: decoders add free slots, encoders take at most what is there."""
    store = await open_store(mesh_config) or hub.store
    key = Names(mesh_config.namespace).credits(7)
    assert await store.take(key, 3) == 0  # absent: nothing to take
    assert await store.add(key, 5, ttl_s=30) == 5
    results = await asyncio.gather(*(store.take(key, 2) for _ in range(4)))
    assert sorted(results) == [0, 1, 2, 2]  # never more than was granted, whoever asks
    assert await store.add(key, -3) == -3 and await store.take(key, 1) == 0  # a debt is not taken
    assert await store.count_prefix(Names(mesh_config.namespace).credits(7)) == 1
    await store.close()


async def test_bytes_under_a_prefix_count_its_keys_values(mesh_config, hub):
    """What a benchmark and the KV data plane's tests read: the memory of a namespace's keys."""
    store = await open_store(mesh_config) or hub.store
    names = Names(mesh_config.namespace)
    empty = await store.bytes_prefix(names.key_prefix)
    await store.set(names.kv_meta("a"), b"x" * 100_000, ttl_s=30)
    await store.hset(names.kv_meta("b"), {"f": "y" * 1000}, ttl_s=30)
    grown = await store.bytes_prefix(names.key_prefix)
    assert empty == 0 and 101_000 <= grown < 120_000
    await store.delete(names.kv_meta("a"))
    assert await store.bytes_prefix(names.key_prefix) < 2_000
    await store.close()


async def test_a_lease_has_one_holder_and_fences_writes(mesh_config, hub):
    """The scheduler's lease: taken when free, extended by its holder only, released by its holder
    only; a fenced write lands only while the writer holds it."""
    store = await open_store(mesh_config) or hub.store
    names = Names(mesh_config.namespace)
    lease, key = names.scheduler_lease, names.schedule
    assert await store.acquire_lease(lease, "a", ttl_s=30)
    assert await store.acquire_lease(lease, "a", ttl_s=30)  # its holder renews it
    assert not await store.acquire_lease(lease, "b", ttl_s=30)  # nobody else takes it
    assert await store.get(lease) == b"a"
    assert await store.set_while_leased(key, b"by a", lease_key=lease, owner="a")
    assert not await store.set_while_leased(key, b"by b", lease_key=lease, owner="b")
    assert await store.get(key) == b"by a"
    assert not await store.release_lease(lease, "b")  # never someone else's
    assert await store.release_lease(lease, "a")
    assert not await store.release_lease(lease, "a")
    assert not await store.set_while_leased(key, b"by a", lease_key=lease, owner="a")  # released: fenced out
    assert await store.acquire_lease(lease, "b", ttl_s=0.2)  # free again: the other takes it
    deadline = time.monotonic() + 10
    while await store.get(lease) is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # polling the store's own expiry, bounded
    assert not await store.set_while_leased(key, b"by b", lease_key=lease, owner="b")  # lapsed
    assert await store.acquire_lease(lease, "a", ttl_s=30)  # a lapsed lease is free
    assert await store.get(key) == b"by a"
    assert await store.get(lease) == b"a"
    await store.close()


async def test_headers_travel_with_a_message(mesh_config, hub):
    """Text headers (the W3C trace context) arrive with the message, stay with it when it is
    redelivered and dead-lettered; a message published without any has an empty mapping."""
    names = Names(mesh_config.namespace)
    bus = await open_bus(mesh_config, names, hub)
    await bus.declare_queue(names.encode_queue)
    carried = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "vendor=x"}
    await bus.publish(names.encode_queue, b"with", headers=carried)
    await bus.publish(names.encode_queue, b"without")
    sub = await bus.consume(names.encode_queue, prefetch=10)
    first, second = await next_delivery(sub), await next_delivery(sub)
    assert (first.body, dict(first.headers)) == (b"with", carried)
    assert (second.body, dict(second.headers)) == (b"without", {})
    await second.ack()
    await first.reject(requeue=True)
    again = await next_delivery(sub)
    assert again.redelivered and dict(again.headers) == carried
    await again.reject(requeue=False)
    dead = await bus.consume(names.dead_queue, prefetch=1)
    buried = await next_delivery(dead)
    assert buried.body == b"with"
    assert {k: buried.headers[k] for k in carried} == carried  # RabbitMQ adds its x-death ones
    await buried.ack()
    await bus.close()


def test_rabbit_header_values_that_arrive_as_bytes_are_decoded():
    from types import SimpleNamespace

    from common.transport.rabbit import RabbitDelivery

    message = SimpleNamespace(
        body=b"x",
        redelivered=False,
        headers={
            "traceparent": b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "a=b",
            "x-death": [{"count": 1}],
            "x-count": 3,
        },
    )
    delivery = RabbitDelivery(message)  # type: ignore[arg-type]
    assert dict(delivery.headers) == {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "a=b",
    }
    assert dict(RabbitDelivery(SimpleNamespace(body=b"", redelivered=False, headers=None)).headers) == {}


async def test_a_message_past_its_deadline_is_dropped_unread_and_not_dead_lettered(mesh_config, hub):
    """Work whose client has stopped waiting never reaches a consumer: the subscription acks it;
    work still in time arrives with its deadline; a requeued late message is dropped too."""
    names = Names(mesh_config.namespace)
    bus = await open_bus(mesh_config, names, hub)
    await bus.declare_queue(names.encode_queue)
    now = time.time()
    await bus.publish(names.encode_queue, b"late", deadline=now - 1)
    await bus.publish(names.encode_queue, b"soon", deadline=now + 0.5)
    await bus.publish(names.encode_queue, b"timely", deadline=now + 60)
    sub = await bus.consume(names.encode_queue, prefetch=10)
    soon, timely = await next_delivery(sub), await next_delivery(sub)
    assert (soon.body, timely.body) == (b"soon", b"timely")
    assert float(timely.headers[DEADLINE_HEADER]) == pytest.approx(now + 60, abs=0.01)
    await timely.ack()
    while time.time() < now + 0.5:  # let "soon" pass its deadline while it is held, then requeue it
        await asyncio.sleep(0.05)
    await soon.reject(requeue=True)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(anext(aiter(sub)), 0.5)
    assert await bus.queue_depth(names.encode_queue) == 0
    dead = await bus.consume(names.dead_queue, prefetch=10)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(anext(aiter(dead)), 0.5)
    await bus.close()


async def test_a_replayed_dead_message_loses_its_deadline(mesh_config, hub):
    """An operator's replay runs the message again even though its deadline has passed."""
    from common.transport.dead import DeadQueue

    names = Names(mesh_config.namespace)
    bus = await open_bus(mesh_config, names, hub)
    await bus.declare_queue(names.encode_queue)
    await bus.publish(names.encode_queue, b"poison", headers={"traceparent": "t"}, deadline=time.time() + 1)
    sub = await bus.consume(names.encode_queue, prefetch=10)
    await (await next_delivery(sub)).dead_letter("bad bytes")
    letters = DeadQueue(bus, names)
    assert len(await letters.take()) == 1
    replayed, kept = await letters.replay(None)
    assert (len(replayed), kept) == (1, [])
    again = await next_delivery(sub)
    assert again.body == b"poison" and DEADLINE_HEADER not in again.headers and again.headers["traceparent"] == "t"
    await again.ack()
    await bus.close()


async def delete_queue(bus, hub, transport_kind: str, queue: str) -> None:
    """An operator deletes ``queue`` (on RabbitMQ, from a connection of its own)."""
    if transport_kind == "broker":
        await bus.delete(queues=[queue], exchanges=[])
    else:
        hub.broker.delete_queue(queue)


@pytest.mark.parametrize("exclusive", [False, True], ids=["work-queue", "events-queue"])
async def test_a_deleted_queue_is_declared_again_and_consuming_resumes(mesh_config, hub, transport_kind, exclusive):
    names = Names(mesh_config.namespace)
    queue = names.events_queue("gw-test") if exclusive else names.encode_queue
    bus = await open_bus(mesh_config, names, hub)
    operator = await open_bus(mesh_config, names, hub)
    lost = asyncio.Event()
    bus.on_lost(lambda name: name == queue and lost.set())
    await bus.declare_queue(queue, exclusive=exclusive)
    sub = await bus.consume(queue, prefetch=4)
    await bus.publish(queue, b"one")
    held = await next_delivery(sub)
    # (an exclusive queue can be deleted only by its own connection, or by `rabbitmqctl delete_queue`)
    await delete_queue(bus if exclusive else operator, hub, transport_kind, queue)
    await asyncio.wait_for(lost.wait(), TIMEOUT_S)  # the consumer was cancelled: its owner is told
    await held.ack()  # what a consumer held across the deletion settles without error
    await bus.publish(queue, b"two")  # declared again (at once, or by this publish)
    assert (await next_delivery(sub)).body == b"two"  # and consuming resumed on it
    assert await bus.exists(queue)
    await operator.close()
    await bus.close()


async def test_exists_tells_a_missing_queue(mesh_config, hub):
    names = Names(mesh_config.namespace)
    bus = await open_bus(mesh_config, names, hub)
    assert not await bus.exists(names.encode_queue)
    await bus.declare_queue(names.encode_queue)
    assert await bus.exists(names.encode_queue)
    await bus.close()
