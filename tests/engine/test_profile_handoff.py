"""The hand-off probe: its line fit, and one measurement through the real RabbitMQ and Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from common.transport.probe import fit_line, measure_handoff
from tests.brokers import AMQP_URL, REDIS_URL, require_broker


def test_fit_line_goes_through_the_smallest_and_largest_payload():
    latency, bandwidth = fit_line(((1000, 0.002), (5000, 0.003), (101000, 0.012)))
    assert bandwidth == pytest.approx(1e7) and latency == pytest.approx(0.0019)
    assert fit_line(((1000, 0.002),)) == (0.0, 500000.0)  # one size: its mean rate, no fixed cost
    assert fit_line(((1000, 0.002), (2000, 0.001))) == (0.0, 2e6)  # noise: the largest payload's rate


@pytest.mark.broker
def test_measure_handoff_through_the_brokers_and_leave_nothing_behind():
    require_broker()
    from common.names import Names
    from common.transport.port import Unroutable
    from common.transport.rabbit import RabbitBus
    from common.transport.redis_store import RedisStore

    names = Names(f"t{uuid.uuid4().hex[:10]}")

    async def measure_then_look():
        probe = await measure_handoff(
            AMQP_URL, REDIS_URL, sizes=(1 << 10, 1 << 20), rounds=2, hops=3, namespace=names.namespace
        )
        store = await RedisStore.connect(REDIS_URL)
        left = await store.delete_prefix(names.key_prefix)
        await store.close()
        bus = await RabbitBus.connect(AMQP_URL, dead_exchange=names.dead_exchange, dead_queue=names.dead_queue)
        try:
            with pytest.raises(Unroutable):
                await bus.publish(names.probe_queue("handoff"), b"x")  # the probe's queue is gone
        finally:
            await bus.delete(queues=[names.dead_queue], exchanges=[names.dead_exchange])
            await bus.close()
        return probe, left

    probe, left = asyncio.run(measure_then_look())
    assert left == 0
    assert [n for n, _ in probe.store_points] == [1 << 10, 1 << 20]
    assert probe.hop_s > 0 and probe.bandwidth_Bps > 0 and probe.latency_s >= probe.hop_s
    assert "measured" in probe.describe()


def test_unreachable_brokers_are_a_connection_error():
    with pytest.raises(ConnectionError, match="cannot connect to Redis at redis://127.0.0.1:1/0"):
        asyncio.run(measure_handoff(AMQP_URL, "redis://127.0.0.1:1/0", sizes=(1,), rounds=1, hops=1))


@pytest.mark.broker
def test_the_nixl_link_is_measured_between_two_worker_processes():
    require_broker()
    from optimizer.cluster import Link
    from services.bench.handoff import nixl_link
    from tests.brokers import need, nixl_loads

    need(nixl_loads(), "NIXL (nixl-cu12) cannot load")
    link = Link(*nixl_link(AMQP_URL, REDIS_URL, sizes_bytes=(64 << 10, 4 << 20), runs=2))
    assert link.name == "nixl" and link.bandwidth_Bps > 0 and link.latency_s >= 0
    assert link.source.startswith("measured: NIXL read") and "0.0625 MiB" in link.source and "4 MiB" in link.source
