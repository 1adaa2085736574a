"""The ports: what services may ask of a bus and a store.

Bus semantics, identical in both adapters:
- ``publish`` to a queue is confirmed and persistent; publishing to a queue nobody declared raises
  ``Unroutable`` (so a vanished gateway's events are noticed, not silently dropped).
- A consumed message stays unacked until ``ack``; the unacked messages of a consumer that goes
  away (``Subscription.cancel`` for those not yet handed out, the bus closing for all) are
  delivered again, with ``redelivered`` set.
- ``reject(requeue=False)`` sends a message to the dead queue.
- ``broadcast`` on a fanout exchange reaches every subscribed queue.
- ``publish`` may attach ``headers`` (text: W3C trace context, ``common.tracing``); a delivery
  carries them in ``Delivery.headers``, an empty mapping when none came, and keeps them when it
  is redelivered or dead-lettered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import AsyncIterator, Protocol


class Unroutable(Exception):
    """A message was published to a queue that does not exist (any more)."""


class Delivery(Protocol):
    body: bytes
    redelivered: bool

    @property
    def headers(self) -> Mapping[str, str]:
        """The text headers it was published with (empty when none)."""
        ...

    async def ack(self) -> None: ...

    async def reject(self, *, requeue: bool) -> None: ...


class Subscription(Protocol):
    def __aiter__(self) -> AsyncIterator[Delivery]: ...

    async def cancel(self) -> None:
        """Stop receiving; messages received but not yet handed out go back to the queue."""
        ...

    async def set_prefetch(self, count: int) -> None:
        """Hold at most ``count`` unacked messages from now on (``basic.qos``)."""
        ...


class Bus(Protocol):
    async def declare_queue(self, name: str, *, exclusive: bool = False) -> None:
        """Durable work queue with dead-lettering, or (exclusive) one that dies with this bus."""
        ...

    async def declare_fanout(self, exchange: str) -> None: ...

    async def publish(self, queue: str, body: bytes, *, headers: Mapping[str, str] | None = None) -> None: ...

    async def broadcast(self, exchange: str, body: bytes) -> None: ...

    async def consume(self, queue: str, *, prefetch: int, auto_ack: bool = False) -> Subscription:
        """Receive from ``queue``. ``auto_ack``: settled on delivery (for exclusive queues, whose
        messages are worthless once their consumer is gone); ``ack`` is then a no-op."""
        ...

    async def subscribe(self, exchange: str, queue: str) -> Subscription:
        """Declare an exclusive ``queue`` bound to the fanout ``exchange`` and consume it."""
        ...

    async def queue_depth(self, queue: str) -> int: ...

    async def delete(self, *, queues: list[str], exchanges: list[str]) -> None: ...

    async def close(self) -> None: ...


class Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def get_many(self, *keys: str) -> list[bytes | None]:
        """The values of ``keys``, in order (None where absent), in one round trip."""
        ...

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None: ...

    async def set_if_absent(self, key: str, value: bytes, *, ttl_s: float | None = None) -> bool:
        """Atomically set ``key`` unless it exists; True when this call set it."""
        ...

    async def set_once_and_record(self, key: str, value: bytes, *, ttl_s: float, list_key: str,
                                  item: bytes | None, max_len: int) -> bool:
        """``set_if_absent(key, value)``; only when this call set it, ``push_capped(list_key,
        item)`` too (unless ``item`` is None). Atomic, one round trip; True when this call set it."""
        ...

    async def acquire_lease(self, key: str, owner: str, *, ttl_s: float) -> bool:
        """Take the lease ``key`` for ``owner`` (set it to ``owner`` with TTL ``ttl_s``) if nobody
        holds it, or extend it by ``ttl_s`` from now if ``owner`` already does. Atomic; True when
        ``owner`` holds it now, False (and nothing changes) while someone else does."""
        ...

    async def release_lease(self, key: str, owner: str) -> bool:
        """Delete the lease ``key`` if ``owner`` holds it (never someone else's). Atomic; True
        when this call released it."""
        ...

    async def set_while_leased(self, key: str, value: bytes, *, lease_key: str, owner: str) -> bool:
        """Set ``key`` to ``value`` (no TTL) only while the lease ``lease_key`` holds ``owner``: a
        fenced write, check and set in one atomic step. True when it was set, False (and nothing
        changes) when ``owner`` does not hold the lease."""
        ...

    async def delete(self, *keys: str) -> None: ...

    async def hset(self, key: str, mapping: dict[str, str], *, ttl_s: float | None = None) -> None: ...

    async def set_with_hash(self, key: str, value: bytes, hash_key: str, mapping: dict[str, str], *,
                            ttl_s: float) -> None:
        """``set(key, value)`` and ``hset(hash_key, mapping)`` with one TTL, atomically, in one
        round trip (a payload and its metadata appear together)."""
        ...

    async def hgetall(self, key: str) -> dict[str, str]: ...

    async def add(self, key: str, amount: int, *, ttl_s: float | None = None) -> int:
        """Atomically add ``amount`` (may be negative) to the integer at ``key`` (absent: 0);
        return the new value. ``ttl_s`` (re)sets its lifetime."""
        ...

    async def take(self, key: str, up_to: int) -> int:
        """Atomically subtract min(``up_to``, the value if positive) from the integer at ``key``;
        return what was taken (0 when the key is absent, zero or negative)."""
        ...

    async def push_capped(self, key: str, value: bytes, *, max_len: int) -> None:
        """Prepend to a list, keeping its newest ``max_len`` items."""
        ...

    async def list_range(self, key: str, count: int) -> list[bytes]:
        """The newest ``count`` items of a list."""
        ...

    async def delete_prefix(self, prefix: str) -> int: ...

    async def count_prefix(self, prefix: str) -> int:
        """How many keys start with ``prefix`` (a scan: for gauges and tests, not hot paths)."""
        ...

    async def close(self) -> None: ...


@contextlib.asynccontextmanager
async def processing(delivery: Delivery) -> AsyncIterator[Delivery]:
    """Ack after the block succeeds; on an error requeue once, then dead-letter."""
    try:
        yield delivery
    except BaseException:
        await delivery.reject(requeue=not delivery.redelivered)
        raise
    else:
        await delivery.ack()
