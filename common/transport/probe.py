"""Time the mesh's KV hand-off path between two workers: a Redis payload write + read, one RabbitMQ hop.

An encoder leaves a request's KV cache in Redis (``StoreKv.put``) and publishes a small message;
the decoder receives it and reads the payload (``StoreKv.get``). ``measure_handoff`` times the
same operations through the mesh's own adapters (redis-py asyncio, aio-pika with confirms), in
a throw-away namespace that it deletes afterwards, and fits the alpha-beta link model
(seconds = latency + bytes / bandwidth) the optimizer uses for the ``handoff`` link kind:

- store: SET + GET of payloads of several sizes, median of ``rounds`` each, the line through the
  smallest and the largest payload;
- hop: publish -> consume of a small message on an exclusive queue, median of ``hops``;
- latency = store intercept + hop; bandwidth = 1 / store slope.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from common.names import Names
from common.transport.rabbit import RabbitBus
from common.transport.redis_store import RedisStore

T = TypeVar("T")

PAYLOAD_SIZES = (64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20)  # bytes: a few KV caches' worth
ROUNDS = 5
HOPS = 20
HOP_BODY = b"x" * 200  # about a KvReady message
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class HandoffProbe:
    store_points: tuple[tuple[int, float], ...]  # (payload bytes, median seconds of SET + GET)
    hop_s: float  # median publish -> consume of a small message
    store_latency_s: float  # fitted intercept of the store line
    bandwidth_Bps: float  # fitted 1 / slope of the store line

    @property
    def latency_s(self) -> float:
        return self.store_latency_s + self.hop_s

    def describe(self) -> str:
        sizes = ", ".join(f"{n >> 10} KiB {t * 1e3:.2f} ms" for n, t in self.store_points)
        return (
            f"measured: Redis SET+GET medians ({sizes}) fitted to {self.store_latency_s * 1e3:.2f} ms + "
            f"bytes / {self.bandwidth_Bps / 1e6:.0f} MB/s, plus one RabbitMQ hop "
            f"{self.hop_s * 1e3:.2f} ms (median of {HOPS})"
        )


def fit_line(points: tuple[tuple[int, float], ...]) -> tuple[float, float]:
    """(intercept s, bandwidth B/s) of seconds = intercept + bytes / bandwidth through the smallest
    and the largest payload: the small one sets the fixed cost, the large one the rate (Redis is
    slower per byte for large values, so this errs on the slow side between them)."""
    (n0, t0), (n1, t1) = min(points), max(points)
    if n1 <= n0 or t1 <= t0:  # one size, or noise: the largest payload's mean rate
        return 0.0, n1 / t1
    bandwidth = (n1 - n0) / (t1 - t0)
    return max(t0 - n0 / bandwidth, 0.0), bandwidth


async def _store_points(
    store: RedisStore, names: Names, sizes: tuple[int, ...], rounds: int
) -> tuple[tuple[int, float], ...]:
    points = []
    for size in sizes:
        key, payload = names.kv_payload(f"probe-{size}"), bytes(size)
        samples = []
        for _ in range(rounds):
            t = time.perf_counter()
            await store.set(key, payload, ttl_s=60.0)
            data = await store.get(key)
            samples.append(time.perf_counter() - t)
            assert data is not None and len(data) == size
        points.append((size, statistics.median(samples)))
        await store.delete(key)
    return tuple(points)


async def _hop_s(bus: RabbitBus, names: Names, hops: int) -> float:
    queue = names.probe_queue("handoff")
    await bus.declare_queue(queue, exclusive=True)
    subscription = await bus.consume(queue, prefetch=10, auto_ack=True)
    received = aiter(subscription)
    samples = []
    try:
        for _ in range(hops):
            t = time.perf_counter()
            await bus.publish(queue, HOP_BODY)
            await asyncio.wait_for(anext(received), TIMEOUT_S)
            samples.append(time.perf_counter() - t)
    finally:
        await subscription.cancel()
    return statistics.median(samples)


async def _connect(what: str, url: str, opening: Awaitable[T]) -> T:
    """Await ``opening``; any failure becomes a ConnectionError that names the broker."""
    try:
        return await asyncio.wait_for(opening, TIMEOUT_S)
    except Exception as exc:  # aio-pika and redis raise their own error types
        raise ConnectionError(f"cannot connect to {what} at {url}: {exc or type(exc).__name__}") from exc


async def measure_handoff(
    amqp_url: str,
    redis_url: str,
    *,
    sizes: tuple[int, ...] = PAYLOAD_SIZES,
    rounds: int = ROUNDS,
    hops: int = HOPS,
    namespace: str | None = None,
) -> HandoffProbe:
    """Time the hand-off path through the brokers at ``amqp_url`` and ``redis_url``; every queue,
    exchange and key it makes lives in a fresh namespace (``namespace``, default a random one) and
    is deleted before it returns."""
    names = Names(namespace or f"probe{uuid.uuid4().hex[:8]}")
    store = await _connect("Redis", redis_url, RedisStore.connect(redis_url))
    try:
        bus = await _connect(
            "RabbitMQ",
            amqp_url,
            RabbitBus.connect(amqp_url, dead_exchange=names.dead_exchange, dead_queue=names.dead_queue),
        )
        try:
            points = await _store_points(store, names, sizes, rounds)
            hop = await _hop_s(bus, names, hops)
        finally:
            await bus.delete(queues=[names.probe_queue("handoff"), names.dead_queue], exchanges=[names.dead_exchange])
            await bus.close()
    finally:
        await store.delete_prefix(names.key_prefix)
        await store.close()
    intercept, bandwidth = fit_line(points)
    return HandoffProbe(points, hop, intercept, bandwidth)
