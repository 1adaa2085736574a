"""In-memory twins of the bus and the store, with the same delivery semantics as the real ones.

One ``MemoryBroker`` stands for the RabbitMQ server; each service opens its own ``MemoryBus`` on it
(a connection). Closing a bus redelivers whatever its consumers held unacked, as RabbitMQ does when
a connection drops. Everything runs on one event loop. The broker counts each message's deliveries
itself (``_Message.attempts``), as the RabbitMQ adapter does with its counter in Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from common.transport.port import (
    DEAD_QUEUE_MAX,
    DELIVERY_LIMIT,
    OnDead,
    OnLost,
    Unroutable,
    check_name,
    dead_headers,
    past_deadline,
    past_limit,
    with_deadline,
)

_consumer_ids = itertools.count()
NO_HEADERS: Mapping[str, str] = MappingProxyType({})


@dataclass
class _Message:
    body: bytes
    redelivered: bool = False
    headers: Mapping[str, str] = field(default_factory=lambda: NO_HEADERS)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    attempts: int = 0  # times handed out to a consumer (a release takes one back)


@dataclass
class _Queue:
    name: str
    dead_letter: str | None  # queue that rejected messages go to
    owner: MemoryBus | None  # exclusive queues die with their bus
    ready: deque[_Message] = field(default_factory=deque)
    consumers: list[MemorySubscription] = field(default_factory=list)
    turn: int = 0
    max_length: int | None = None  # beyond it the oldest ready message is dropped (drop-head)

    def append(self, message: _Message) -> None:
        self.ready.append(message)
        while self.max_length is not None and len(self.ready) > self.max_length:
            self.ready.popleft()


class MemoryBroker:
    """The shared state: queues and fanout bindings."""

    def __init__(self) -> None:
        self.queues: dict[str, _Queue] = {}
        self.fanouts: dict[str, set[str]] = {}
        self.buses: list[MemoryBus] = []

    def delete_queue(self, name: str) -> None:
        """An operator deletes ``name``: its messages go, its consumers are cancelled, and each
        bus that declared or consumed it declares it again and tells its listeners."""
        queue = self.queues.pop(name, None)
        if queue is None:
            return
        cancelled, queue.consumers = queue.consumers, []
        for consumer in cancelled:  # what they hold unacked stays theirs, as on RabbitMQ
            consumer.active = False
        for bus in list(self.buses):
            bus.queue_lost(queue, cancelled)

    def dispatch(self, queue: _Queue) -> None:
        """Hand ready messages to consumers with free credit, round robin."""
        while queue.ready:
            consumer = self._next_consumer(queue)
            if consumer is None:
                return
            consumer.deliver(queue.ready.popleft())

    def _next_consumer(self, queue: _Queue) -> MemorySubscription | None:
        n = len(queue.consumers)
        for i in range(n):
            consumer = queue.consumers[(queue.turn + i) % n]
            if consumer.has_credit():
                queue.turn = (queue.turn + i + 1) % n
                return consumer
        return None

    def requeue(self, queue_name: str, message: _Message) -> None:
        queue = self.queues.get(queue_name)
        if queue is not None:
            queue.ready.appendleft(
                _Message(
                    message.body, redelivered=True, headers=message.headers, id=message.id, attempts=message.attempts
                )
            )
            self.dispatch(queue)

    def dead_letter(self, queue_name: str, message: _Message, reason: str) -> None:
        queue = self.queues.get(queue_name)
        if queue is not None and queue.dead_letter in self.queues:
            target = self.queues[queue.dead_letter]
            headers = dead_headers(
                message.headers, reason=reason, queue=queue_name, attempts=message.attempts, message_id=message.id
            )
            target.append(_Message(message.body, headers=MappingProxyType(headers), id=message.id))
            self.dispatch(target)


class MemoryDelivery:
    def __init__(self, subscription: MemorySubscription, message: _Message) -> None:
        self.body = message.body
        self.redelivered = message.redelivered
        self.headers = message.headers
        self.queue = subscription.queue.name
        self.limit = subscription.limit
        self.attempts = message.attempts  # counted when handed out (MemorySubscription.__anext__)
        self._message = message
        self._subscription = subscription
        self.settled = False

    async def ack(self) -> None:
        self._subscription.settle(self)

    async def reject(self, *, requeue: bool) -> None:
        if requeue:
            if self._subscription.settle(self):
                self._subscription.broker.requeue(self.queue, self._message)
        else:
            await self.dead_letter("rejected")

    async def release(self) -> None:
        if self._subscription.settle(self):
            if self._subscription.counted:
                self._message.attempts -= 1
            self._subscription.broker.requeue(self.queue, self._message)

    async def dead_letter(self, reason: str) -> None:
        if self._subscription.settle(self):
            self._subscription.broker.dead_letter(self.queue, self._message, reason)

    def return_to_queue(self) -> None:
        if not self.settled:
            self.settled = True
            self._subscription.unacked.discard(self)
            self._subscription.broker.requeue(self._subscription.queue.name, self._message)


class MemorySubscription:
    def __init__(
        self,
        broker: MemoryBroker,
        queue: _Queue,
        prefetch: int,
        auto_ack: bool = False,
        *,
        limit: int = DELIVERY_LIMIT,
        counted: bool = True,
        on_dead: OnDead | None = None,
    ) -> None:
        self.broker, self.queue, self.prefetch, self.auto_ack = broker, queue, prefetch, auto_ack
        self.limit, self.counted, self.on_dead = limit, counted and not auto_ack, on_dead
        self.unacked: set[MemoryDelivery] = set()
        self.buffer: asyncio.Queue[MemoryDelivery | None] = asyncio.Queue()
        self.active = True
        self.id = next(_consumer_ids)

    def has_credit(self) -> bool:
        return self.active and len(self.unacked) < self.prefetch

    async def set_prefetch(self, count: int) -> None:
        self.prefetch = count
        self.broker.dispatch(self.queue)

    def deliver(self, message: _Message) -> None:
        delivery = MemoryDelivery(self, message)
        if self.auto_ack:
            delivery.settled = True
        else:
            self.unacked.add(delivery)
        self.buffer.put_nowait(delivery)

    def settle(self, delivery: MemoryDelivery) -> bool:
        """Mark settled; False if it already was (acks are idempotent)."""
        if delivery.settled:
            return False
        delivery.settled = True
        self.unacked.discard(delivery)
        self.broker.dispatch(self.queue)
        return True

    def __aiter__(self) -> MemorySubscription:
        return self

    async def __anext__(self) -> MemoryDelivery:
        while True:
            delivery = await self.buffer.get()
            if delivery is None:
                raise StopAsyncIteration
            if not self.counted:
                delivery.attempts = 1
                return delivery
            if await past_deadline(delivery):
                continue
            delivery._message.attempts += 1
            delivery.attempts = delivery._message.attempts
            if not await past_limit(delivery, self.on_dead):
                return delivery

    async def cancel(self) -> None:
        if not self.active:
            return
        self.active = False
        if self in self.queue.consumers:
            self.queue.consumers.remove(self)
        while not self.buffer.empty():
            pending = self.buffer.get_nowait()
            if pending is not None:
                pending.return_to_queue()
        self.buffer.put_nowait(None)

    def drop_connection(self) -> None:
        """The connection died: everything unacked goes back."""
        self.active = False
        for delivery in list(self.unacked):
            delivery.return_to_queue()
        self.unacked.clear()
        self.buffer.put_nowait(None)


class MemoryBus:
    """One connection to a MemoryBroker."""

    def __init__(
        self,
        broker: MemoryBroker,
        *,
        dead_queue: str | None = None,
        delivery_limit: int = DELIVERY_LIMIT,
        dead_queue_max: int = DEAD_QUEUE_MAX,
    ) -> None:
        self.broker = broker
        self.dead_queue = dead_queue
        self.delivery_limit = delivery_limit
        self.subscriptions: list[MemorySubscription] = []
        self.closed = False
        self.declared: dict[str, bool] = {}  # queues this bus declared -> exclusive
        self._on_lost: list[OnLost] = []
        broker.buses.append(self)
        if dead_queue is not None and dead_queue not in broker.queues:
            broker.queues[dead_queue] = _Queue(dead_queue, None, None, max_length=dead_queue_max)

    def on_lost(self, callback: OnLost) -> None:
        self._on_lost.append(callback)

    def queue_lost(self, queue: _Queue, cancelled: list[MemorySubscription]) -> None:
        mine = queue.name in self.declared
        consumers = [s for s in cancelled if s in self.subscriptions]
        if self.closed or (not mine and not consumers):
            return
        if mine:
            self._declare(queue.name, self.declared[queue.name])
        for old in consumers:  # consuming resumes on the new queue
            if queue.name in self.broker.queues:
                old.queue, old.active = self.broker.queues[queue.name], True
                old.queue.consumers.append(old)
                self.broker.dispatch(old.queue)
        for callback in self._on_lost:
            callback(queue.name)

    async def exists(self, queue: str) -> bool:
        return queue in self.broker.queues

    async def declare_queue(self, name: str, *, exclusive: bool = False) -> None:
        self.declared[name] = exclusive
        self._declare(name, exclusive)

    def _declare(self, name: str, exclusive: bool) -> None:
        if name not in self.broker.queues:
            dead = None if exclusive else self.dead_queue
            self.broker.queues[name] = _Queue(name, dead, self if exclusive else None)

    async def declare_fanout(self, exchange: str) -> None:
        self.broker.fanouts.setdefault(exchange, set())

    async def publish(
        self, queue: str, body: bytes, *, headers: Mapping[str, str] | None = None, deadline: float | None = None
    ) -> None:
        check_name(queue)
        target = self.broker.queues.get(queue)
        if target is None:
            raise Unroutable(queue)
        headers = with_deadline(headers, deadline)
        target.append(_Message(body, headers=MappingProxyType(headers) if headers else NO_HEADERS))
        self.broker.dispatch(target)

    async def broadcast(self, exchange: str, body: bytes) -> None:
        for name in list(self.broker.fanouts.get(exchange, ())):
            if name in self.broker.queues:
                await self.publish(name, body)

    async def consume(
        self, queue: str, *, prefetch: int, auto_ack: bool = False, on_dead: OnDead | None = None
    ) -> MemorySubscription:
        target = self.broker.queues.get(queue)
        if target is None:
            raise Unroutable(queue)
        counted = target.owner is None and queue != self.dead_queue  # work queues (not the dead one)
        subscription = MemorySubscription(
            self.broker, target, prefetch, auto_ack, limit=self.delivery_limit, counted=counted, on_dead=on_dead
        )
        target.consumers.append(subscription)
        self.subscriptions.append(subscription)
        self.broker.dispatch(target)
        return subscription

    async def subscribe(self, exchange: str, queue: str) -> MemorySubscription:
        await self.declare_fanout(exchange)
        await self.declare_queue(queue, exclusive=True)
        self.broker.fanouts[exchange].add(queue)
        return await self.consume(queue, prefetch=1000)

    async def queue_depth(self, queue: str) -> int:
        target = self.broker.queues.get(queue)
        return 0 if target is None else len(target.ready)

    async def delete(self, *, queues: list[str], exchanges: list[str]) -> None:
        for name in queues:
            self.broker.queues.pop(name, None)
        for name in exchanges:
            self.broker.fanouts.pop(name, None)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for subscription in self.subscriptions:
            if subscription in subscription.queue.consumers:
                subscription.queue.consumers.remove(subscription)
            subscription.drop_connection()
        owned = [q.name for q in self.broker.queues.values() if q.owner is self]
        for name in owned:
            del self.broker.queues[name]
        if self in self.broker.buses:
            self.broker.buses.remove(self)


class MemoryStore:
    """Key/value, hashes and lists with TTLs, in a dict; expiry is checked on read."""

    def __init__(self) -> None:
        self._data: dict[str, object] = {}
        self._expires: dict[str, float] = {}

    def _live(self, key: str) -> object | None:
        deadline = self._expires.get(key)
        if deadline is not None and time.monotonic() >= deadline:
            self._data.pop(key, None)
            self._expires.pop(key, None)
        return self._data.get(key)

    def _put(self, key: str, value: object, ttl_s: float | None) -> None:
        self._data[key] = value
        if ttl_s is None:
            self._expires.pop(key, None)
        else:
            self._expires[key] = time.monotonic() + ttl_s

    async def get(self, key: str) -> bytes | None:
        value = self._live(key)
        return value if isinstance(value, bytes) else None

    async def get_many(self, *keys: str) -> list[bytes | None]:
        return [await self.get(key) for key in keys]

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None:
        self._put(key, value, ttl_s)

    async def set_if_absent(self, key: str, value: bytes, *, ttl_s: float | None = None) -> bool:
        if self._live(key) is not None:
            return False
        self._put(key, value, ttl_s)
        return True

    async def set_once_and_record(
        self, key: str, value: bytes, *, ttl_s: float, list_key: str, item: bytes | None, max_len: int
    ) -> bool:
        if not await self.set_if_absent(key, value, ttl_s=ttl_s):
            return False
        if item is not None:
            await self.push_capped(list_key, item, max_len=max_len)
        return True

    async def acquire_lease(self, key: str, owner: str, *, ttl_s: float) -> bool:
        if self._live(key) not in (None, owner.encode()):
            return False
        self._put(key, owner.encode(), ttl_s)
        return True

    async def release_lease(self, key: str, owner: str) -> bool:
        if self._live(key) != owner.encode():
            return False
        await self.delete(key)
        return True

    async def set_while_leased(self, key: str, value: bytes, *, lease_key: str, owner: str) -> bool:
        if self._live(lease_key) != owner.encode():
            return False
        self._put(key, value, None)
        return True

    async def delete(self, *keys: str) -> None:
        for key in keys:
            self._data.pop(key, None)
            self._expires.pop(key, None)

    async def hset(self, key: str, mapping: dict[str, str], *, ttl_s: float | None = None) -> None:
        current = self._live(key)
        merged = dict(current) if isinstance(current, dict) else {}
        merged.update(mapping)
        self._put(key, merged, ttl_s if ttl_s is not None else self._ttl_left(key))

    async def set_with_hash(
        self, key: str, value: bytes, hash_key: str, mapping: dict[str, str], *, ttl_s: float
    ) -> None:
        self._put(key, value, ttl_s)
        await self.hset(hash_key, mapping, ttl_s=ttl_s)

    def _ttl_left(self, key: str) -> float | None:
        deadline = self._expires.get(key)
        return None if deadline is None else max(deadline - time.monotonic(), 0.0)

    async def hgetall(self, key: str) -> dict[str, str]:
        value = self._live(key)
        return dict(value) if isinstance(value, dict) else {}

    async def add(self, key: str, amount: int, *, ttl_s: float | None = None) -> int:
        value = self._live(key)
        total = (int(value) if isinstance(value, bytes) else 0) + amount
        self._put(key, str(total).encode(), ttl_s if ttl_s is not None else self._ttl_left(key))
        return total

    async def take(self, key: str, up_to: int) -> int:
        value = self._live(key)
        have = int(value) if isinstance(value, bytes) else 0
        taken = max(min(up_to, have), 0)
        if taken:
            self._put(key, str(have - taken).encode(), self._ttl_left(key))
        return taken

    async def push_capped(self, key: str, value: bytes, *, max_len: int) -> None:
        current = self._live(key)
        items = list(current) if isinstance(current, list) else []
        self._put(key, [value, *items][:max_len], None)

    async def list_range(self, key: str, count: int) -> list[bytes]:
        value = self._live(key)
        return list(value)[:count] if isinstance(value, list) else []

    async def count_prefix(self, prefix: str) -> int:
        return sum(1 for key in list(self._data) if key.startswith(prefix) and self._live(key) is not None)

    async def keys_prefix(self, prefix: str) -> list[str]:
        return [key for key in list(self._data) if key.startswith(prefix) and self._live(key) is not None]

    async def bytes_prefix(self, prefix: str) -> int:
        """Key and value bytes (bytes and str values; a container counts its items' bytes)."""

        def size(value: object) -> int:
            if isinstance(value, (bytes, bytearray, str)):
                return len(value)
            items = value.items() if isinstance(value, dict) else value if isinstance(value, (list, set)) else ()
            return sum(size(x) for item in items for x in (item if isinstance(item, tuple) else (item,)))

        return sum(len(key) + size(self._live(key)) for key in list(self._data) if key.startswith(prefix))

    async def delete_prefix(self, prefix: str) -> int:
        doomed = [key for key in self._data if key.startswith(prefix)]
        await self.delete(*doomed)
        return len(doomed)

    async def close(self) -> None:
        return None
