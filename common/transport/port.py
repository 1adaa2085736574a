"""The ports: what services may ask of a bus and a store.

Bus semantics, identical in both adapters:
- ``publish`` to a queue is confirmed and persistent; publishing to a queue nobody declared raises
  ``Unroutable`` (so a vanished gateway's events are noticed, not silently dropped).
- A consumed message stays unacked until ``ack``; the unacked messages of a consumer that goes
  away (``Subscription.cancel`` for those not yet handed out, the bus closing for all) are
  delivered again, with ``redelivered`` set.
- Every delivery knows how many times it was handed out (``Delivery.attempts``, counted by the
  bus, 1 the first time): a consumer that dies holding it, and ``reject(requeue=True)``, each
  count an attempt; ``release()`` gives it back without counting (work given back unstarted).
  A message handed out more than the bus's ``delivery_limit`` times goes to the dead queue instead
  of to a consumer (with ``consume``'s ``on_dead`` told first, so its request can fail).
- ``dead_letter(reason)`` sends a message to the dead queue with its reason and origin in headers
  (``DEAD_HEADERS``); ``reject(requeue=False)`` does too, with the reason "rejected". The dead
  queue is bounded: past its length limit the oldest dead message is dropped.
- A queue name (routing key) over 255 bytes cannot be published to: ``NameTooLong`` (an
  ``Unroutable``), in both adapters.
- ``broadcast`` on a fanout exchange reaches every subscribed queue.
- The topology heals: a queue this bus declared that the broker lost (deleted by an operator, a
  node's loss) is declared again when a publish finds it missing or its consumer is cancelled, and
  consuming resumes on it; ``on_lost`` listeners are told, since its messages went with it.
- ``publish`` may attach ``headers`` (text: W3C trace context, ``common.tracing``); a delivery
  carries them in ``Delivery.headers``, an empty mapping when none came, and keeps them when it
  is redelivered or dead-lettered.
- ``publish(..., deadline=T)``: the message is worth nothing after ``T`` (epoch seconds: its
  request's deadline, when its client stops waiting). A work queue's consumer never receives it
  after then: the subscription acks and drops it (``DEADLINE_HEADER`` carries ``T``; hosts'
  clocks are assumed synchronised, a skew moves deadlines by as much). Not dead-lettered: nothing
  is wrong with it, only late. (Not AMQP's per-message TTL: the broker would dead-letter expired
  messages through the work queues' dead-letter exchange, filling the dead queue with them.)
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Protocol

log = logging.getLogger("exegpt.transport")

DELIVERY_LIMIT = 3  # default: handed out at most this many times, then dead-lettered
DEAD_QUEUE_MAX = 10_000  # default: dead messages kept (the oldest dropped beyond)
MAX_NAME_BYTES = 255  # AMQP short string: the longest queue name / routing key
REASON_MAX = 500  # characters of a dead-letter reason kept

# Headers a dead-lettered message carries (besides those it was published with).
REASON_HEADER = "x-exegpt-reason"  # why: "undecodable: ...", "delivery limit 3 reached", ...
ORIGIN_HEADER = "x-exegpt-queue"  # the queue it was taken from (replay publishes it there again)
ATTEMPTS_HEADER = "x-exegpt-attempts"  # deliveries it had
DEAD_AT_HEADER = "x-exegpt-dead-at"  # when, epoch seconds
ID_HEADER = "x-exegpt-id"  # the message's id (the attempt counter's key)
DEAD_HEADERS = (REASON_HEADER, ORIGIN_HEADER, ATTEMPTS_HEADER, DEAD_AT_HEADER, ID_HEADER)
DEADLINE_HEADER = "x-exegpt-deadline"  # epoch seconds after which the message is dropped unread
REENCODED_HEADER = "x-exegpt-reencoded"  # encode work sent again because its KV cache was lost


class Unroutable(Exception):
    """A message was published to a queue that does not exist (any more)."""


class NameTooLong(Unroutable):
    """A queue name (routing key) longer than 255 bytes: no broker routes it."""


def check_name(queue: str) -> None:
    size = len(queue.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise NameTooLong(f"routing key too long: {size} bytes (at most {MAX_NAME_BYTES}): {queue[:40]!r}...")


def dead_headers(
    headers: Mapping[str, str], *, reason: str, queue: str, attempts: int, message_id: str
) -> dict[str, str]:
    """``headers`` and what a dead-lettered message carries about its death."""
    return {
        **headers,
        REASON_HEADER: reason[:REASON_MAX],
        ORIGIN_HEADER: queue,
        ATTEMPTS_HEADER: str(attempts),
        DEAD_AT_HEADER: f"{time.time():.3f}",
        ID_HEADER: message_id,
    }


def limit_reason(limit: int) -> str:
    return f"delivery limit {limit} reached"


class Delivery(Protocol):
    body: bytes
    redelivered: bool
    attempts: int  # times handed out so far, this one included (counted by the bus, not the flag)
    limit: int  # the bus's delivery limit: attempts == limit is the last
    queue: str  # the queue it came from

    @property
    def headers(self) -> Mapping[str, str]:
        """The text headers it was published with (empty when none)."""
        ...

    async def ack(self) -> None: ...

    async def reject(self, *, requeue: bool) -> None:
        """``requeue``: back to the queue, a failed attempt; else to the dead queue ("rejected")."""
        ...

    async def release(self) -> None:
        """Back to the queue without counting this delivery as an attempt (not started here)."""
        ...

    async def dead_letter(self, reason: str) -> None:
        """To the dead queue, with ``reason`` (and origin, attempts, time) in its headers."""
        ...


OnDead = Callable[[Delivery, str], Awaitable[None]]  # a message about to be dead-lettered, and why
OnLost = Callable[[str], None]  # the broker lost a queue's messages (the queue's name; "" for a reconnect)


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

    async def publish(
        self, queue: str, body: bytes, *, headers: Mapping[str, str] | None = None, deadline: float | None = None
    ) -> None:
        """Confirmed and persistent; ``deadline`` (epoch seconds): dropped unread after it."""
        ...

    async def broadcast(self, exchange: str, body: bytes) -> None: ...

    async def consume(
        self, queue: str, *, prefetch: int, auto_ack: bool = False, on_dead: OnDead | None = None
    ) -> Subscription:
        """Receive from ``queue``. ``auto_ack``: settled on delivery (for exclusive queues, whose
        messages are worthless once their consumer is gone); ``ack`` is then a no-op.
        ``on_dead``: called with a message past the delivery limit before it is dead-lettered
        (to fail its request); what it raises is logged, never stops the consumer."""
        ...

    async def subscribe(self, exchange: str, queue: str) -> Subscription:
        """Declare an exclusive ``queue`` bound to the fanout ``exchange`` and consume it."""
        ...

    async def queue_depth(self, queue: str) -> int: ...

    async def exists(self, queue: str) -> bool:
        """Whether the broker has ``queue`` now (a publish to it would be routed)."""
        ...

    def on_lost(self, callback: OnLost) -> None:
        """Call ``callback(queue)`` whenever messages of ours may have been lost with a queue:
        the broker deleted a queue this bus consumes, or one it declared turned out missing on
        publishing (both are declared again by the bus), or the connection was re-established
        (``""``: every exclusive queue was new). Whoever owns requests re-publishes them."""
        ...

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

    async def set_once_and_record(
        self, key: str, value: bytes, *, ttl_s: float, list_key: str, item: bytes | None, max_len: int
    ) -> bool:
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

    async def set_with_hash(
        self, key: str, value: bytes, hash_key: str, mapping: dict[str, str], *, ttl_s: float
    ) -> None:
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

    async def keys_prefix(self, prefix: str) -> list[str]:
        """The keys that start with ``prefix`` (a scan: for start-up and tests, not hot paths)."""
        ...

    async def bytes_prefix(self, prefix: str) -> int:
        """Memory the keys starting with ``prefix`` take (Redis: MEMORY USAGE; a scan: for
        benchmarks and tests, not hot paths)."""
        ...

    async def close(self) -> None: ...


async def tell(on_dead: OnDead | None, delivery: Delivery, reason: str) -> None:
    """Run ``on_dead`` for ``delivery``; what it raises is logged (a poison message's request
    may be beyond failing)."""
    if on_dead is None:
        return
    try:
        await on_dead(delivery, reason)
    except Exception as exc:
        log.warning("dead-lettering a message from %s: its request could not be failed: %r", delivery.queue, exc)


def with_deadline(headers: Mapping[str, str] | None, deadline: float | None) -> dict[str, str] | None:
    """The headers to publish: ``headers`` and, when there is one, the deadline."""
    if deadline is None:
        return dict(headers) if headers else None
    return {**(headers or {}), DEADLINE_HEADER: f"{deadline:.3f}"}


def deadline_of(headers: Mapping[str, str]) -> float | None:
    """The deadline a message was published with (None: none, or one that does not parse)."""
    raw = headers.get(DEADLINE_HEADER)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        return None


expired_count = 0  # messages dropped past their deadline by this process's subscriptions


async def past_deadline(delivery: Delivery) -> bool:
    """Ack and drop ``delivery`` if its deadline has passed (its client has stopped waiting);
    True when it was dropped. Subscriptions run this before counting an attempt."""
    deadline = deadline_of(delivery.headers)
    if deadline is None or time.time() < deadline:
        return False
    global expired_count
    expired_count += 1
    log.info("dropped a message from %s %.1f s past its deadline", delivery.queue, time.time() - deadline)
    await delivery.ack()
    return True


async def past_limit(delivery: Delivery, on_dead: OnDead | None) -> bool:
    """Dead-letter ``delivery`` if it was handed out more than the limit (its earlier consumers
    died or failed with it); True when it was. Subscriptions run this before handing one out."""
    if delivery.attempts <= delivery.limit:
        return False
    reason = limit_reason(delivery.limit)
    await tell(on_dead, delivery, reason)
    await delivery.dead_letter(reason)
    return True


def failure_reason(exc: BaseException) -> str:
    return f"handler raised {type(exc).__name__}: {exc}"[:REASON_MAX]


async def failed(delivery: Delivery, exc: BaseException, on_dead: OnDead | None = None) -> bool:
    """A handler raised ``exc`` for ``delivery``: back to the queue (a counted attempt) unless
    this was its last attempt, then (``on_dead`` told first) to the dead queue with the reason.
    True when it was dead-lettered."""
    if delivery.attempts < delivery.limit:
        await delivery.reject(requeue=True)
        return False
    reason = f"{limit_reason(delivery.limit)}; last: {failure_reason(exc)}"
    await tell(on_dead, delivery, reason)
    await delivery.dead_letter(reason)
    return True


@contextlib.asynccontextmanager
async def processing(
    delivery: Delivery, *, on_dead: OnDead | None = None, swallow: bool = False
) -> AsyncIterator[Delivery]:
    """The per-message guard: ack after the block succeeds; on an error, a counted attempt back
    to the queue, or at the last attempt the dead queue with the reason (``failed``). Re-raises
    unless ``swallow`` (a consumer loop that must go on with the next message); cancellation
    gives the message back (counted: its consumer stopped holding it) and propagates."""
    try:
        yield delivery
    except Exception as exc:
        log.warning(
            "message from %s failed (attempt %d of %d): %r", delivery.queue, delivery.attempts, delivery.limit, exc
        )
        await failed(delivery, exc, on_dead)
        if not swallow:
            raise
    except BaseException:
        await delivery.reject(requeue=True)
        raise
    else:
        await delivery.ack()
