"""The bus over RabbitMQ (aio-pika): robust connection, publisher confirms, per-consumer prefetch.

Work queues are durable (classic), messages persistent, and each published message gets a
``message_id``. A message is dead-lettered by publishing it to the dead queue with its reason in
headers, then acking it; what the broker itself dead-letters (through the work queues' dead-letter
exchange) carries ``x-death``, read as the same reason and origin headers. The dead queue is
bounded (``x-max-length``, drop-head); a dead queue an older version declared without the bound is
replaced while empty, and kept (with a warning) until it is emptied otherwise.

Deliveries are counted in the store (``Attempts``), since classic queues only flag a redelivery:
a first delivery (not redelivered) is attempt 1 without a round trip; a redelivered one adds one
to ``{ns}:attempts:{message_id}``. Each consumer has its own channel so that its prefetch
(``basic.qos``, set on the channel, so that it can change while consuming) bounds only its own
unacked messages.

``queue_type="quorum"``: the durable queues (work, jobs, replies, dead) are quorum queues, replicated
across the broker's nodes, with the broker's own delivery limit (``x-delivery-limit``) behind the
counted one. A quorum queue refuses a channel-wide prefetch, so a subscription to one keeps its limit
with consumers of their own prefetch (``QuorumSubscription``). Exclusive queues stay classic.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelClosed, ChannelNotFoundEntity, ChannelPreconditionFailed, DeliveryError
from aiormq.exceptions import ChannelLockedResource

from common.transport.port import (
    DEAD_QUEUE_MAX,
    DELIVERY_LIMIT,
    ORIGIN_HEADER,
    REASON_HEADER,
    OnDead,
    OnLost,
    Store,
    Unroutable,
    check_name,
    dead_headers,
    past_deadline,
    past_limit,
    with_deadline,
)

if TYPE_CHECKING:
    from pamqp.common import FieldTable  # aio-pika's field tables (its own dependency)

log = logging.getLogger("exegpt.transport")
ATTEMPTS_TTL_S = 7 * 24 * 3600.0  # a redelivered message's attempt count (deleted once it is settled)


class Attempts:
    """Delivery counts of redelivered messages, in the store: ``{prefix}{message_id}``."""

    def __init__(self, store: Store, prefix: str) -> None:
        self.store, self.prefix = store, prefix

    async def add(self, message_id: str, amount: int) -> int:
        return await self.store.add(self.prefix + message_id, amount, ttl_s=ATTEMPTS_TTL_S)

    async def forget(self, message_id: str) -> None:
        await self.store.delete(self.prefix + message_id)


def message_id_of(message: AbstractIncomingMessage) -> str:
    """The id it was published with; a digest of its body for one published without (elsewhere)."""
    return message.message_id or hashlib.sha256(message.body).hexdigest()[:32]


def _text_headers(raw: Mapping[str, object] | None) -> dict[str, str]:
    """Values that came as bytes are decoded (UTF-8), others (tables, numbers) are left out; a
    message the broker dead-lettered gets the reason and origin headers from its ``x-death``."""
    raw = raw or {}
    headers = {
        key: value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        for key, value in raw.items()
        if isinstance(value, (str, bytes))
    }
    deaths = raw.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping) and REASON_HEADER not in headers:
        death = deaths[0]
        queue, reason = death.get("queue"), death.get("reason")
        if isinstance(queue, (str, bytes)):
            headers[ORIGIN_HEADER] = queue.decode() if isinstance(queue, bytes) else queue
        if isinstance(reason, (str, bytes)):
            headers[REASON_HEADER] = f"broker: {reason.decode() if isinstance(reason, bytes) else reason}"
    return headers


class RabbitDelivery:
    def __init__(
        self,
        message: AbstractIncomingMessage,
        settled: bool = False,
        on_settled: Callable[[], Awaitable[None]] | None = None,
        *,
        queue: str = "",
        bus: RabbitBus | None = None,
        counted: bool = False,
    ) -> None:
        self.body = message.body
        self.redelivered = bool(message.redelivered)
        self.queue = queue
        self.attempts = 2 if self.redelivered else 1  # until ``count`` asks the store
        self.limit = bus.delivery_limit if bus is not None else DELIVERY_LIMIT
        self._message = message
        self._settled = settled
        self._on_settled = on_settled
        self._headers: dict[str, str] | None = None
        self._bus = bus
        self._counted = counted
        self._touched = False  # its counter in the store may exist: delete it once settled

    @property
    def message_id(self) -> str:
        return message_id_of(self._message)

    @property
    def headers(self) -> Mapping[str, str]:
        """The message's text headers; values that came as bytes are decoded (UTF-8), others
        (tables, numbers: the broker's own, such as ``x-death``) are left out. Read on first use."""
        if self._headers is None:
            self._headers = _text_headers(self._message.headers)
        return self._headers

    async def count(self) -> None:
        """Set ``attempts``: 1 for a first delivery; for a redelivered one, the store's count.
        Without a counter, or while the store fails, a redelivery counts as attempt 2."""
        attempts = self._bus.attempts if self._bus is not None and self._counted else None
        if not self.redelivered or attempts is None:
            return
        try:
            self.attempts = 1 + await attempts.add(self.message_id, 1)
            self._touched = True
        except Exception as exc:
            log.warning("attempt counter unavailable (%r): a redelivery counts as attempt 2", exc)

    async def ack(self) -> None:
        if not self._settled:
            self._settled = True
            await self._message.ack()
            await self._done()

    async def reject(self, *, requeue: bool) -> None:
        if not requeue:
            await self.dead_letter("rejected")
        elif not self._settled:
            self._settled = True
            await self._message.reject(requeue=True)
            await self._on_settled_only()

    async def release(self) -> None:
        if self._settled:
            return
        attempts = self._bus.attempts if self._bus is not None and self._counted else None
        if attempts is not None:
            try:
                await attempts.add(self.message_id, -1)
            except Exception as exc:
                log.warning("attempt counter unavailable (%r): this give-back counts as an attempt", exc)
        self._settled = True
        await self._message.reject(requeue=True)
        await self._on_settled_only()

    async def dead_letter(self, reason: str) -> None:
        if self._settled:
            return
        if self._bus is None:  # no bus to publish with: the queue's dead-letter exchange
            self._settled = True
            await self._message.reject(requeue=False)
            await self._done()
            return
        headers = dead_headers(
            self.headers, reason=reason, queue=self.queue, attempts=self.attempts, message_id=self.message_id
        )
        try:
            await self._bus.publish_dead(self.body, headers, self.message_id)
        except Unroutable:  # no dead queue (deleted under us): the queue's dead-letter exchange
            log.warning(
                "dead queue missing: %s's message rejected to the dead-letter exchange (%s)", self.queue, reason
            )
            self._settled = True
            await self._message.reject(requeue=False)
            await self._done()
            return
        await self.ack()

    async def _done(self) -> None:
        """Settled for good: its counter goes too."""
        if self._touched and self._bus is not None and self._bus.attempts is not None:
            try:
                await self._bus.attempts.forget(self.message_id)
            except Exception as exc:  # it expires by itself
                log.info("attempt counter not deleted: %r", exc)
        await self._on_settled_only()

    async def _on_settled_only(self) -> None:
        if self._on_settled is not None:
            await self._on_settled()


class TopologyMismatch(RuntimeError):
    """A queue exists on the broker with other arguments than ours (another queue type)."""


class RabbitSubscription:
    """One consumer on its own channel. Cancelled, it closes the channel once every delivery it
    handed out is settled (closing earlier would give the broker back messages still being
    worked on), so consumers that come and go (a worker changing role) leave no channel behind."""

    def __init__(
        self,
        channel: AbstractChannel,
        queue: AbstractQueue,
        auto_ack: bool = False,
        *,
        bus: RabbitBus | None = None,
        counted: bool = False,
        on_dead: OnDead | None = None,
    ) -> None:
        self._channel, self._queue, self._auto_ack = channel, queue, auto_ack
        self._bus, self._counted, self._on_dead = bus, counted and not auto_ack, on_dead
        self._buffer: asyncio.Queue[RabbitDelivery | None] = asyncio.Queue()
        self._tag: str | None = None
        self._unsettled = 0
        self._cancelled = False

    async def start(self) -> None:
        self._tag = await self._queue.consume(self._on_message, no_ack=self._auto_ack)

    async def set_prefetch(self, count: int) -> None:
        await self._channel.set_qos(prefetch_count=count, global_=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._cancelled:  # in flight when the consumer was cancelled: back to the queue
            if not self._auto_ack:
                await message.reject(requeue=True)
            return
        if self._auto_ack:
            await self._buffer.put(RabbitDelivery(message, settled=True, queue=self._queue.name))
        else:
            self._unsettled += 1
            await self._buffer.put(
                RabbitDelivery(
                    message, on_settled=self._settled, queue=self._queue.name, bus=self._bus, counted=self._counted
                )
            )

    async def _settled(self) -> None:
        self._unsettled -= 1
        if self._cancelled and self._unsettled == 0:
            await self._close_channel()

    async def _close_channel(self) -> None:
        if not self._channel.is_closed:
            try:
                await self._channel.close()
            except (ChannelClosed, ConnectionError, RuntimeError):
                pass  # the connection went first; nothing is left to release

    def __aiter__(self) -> RabbitSubscription:
        return self

    async def __anext__(self) -> RabbitDelivery:
        while True:
            delivery = await self._buffer.get()
            if delivery is None:
                raise StopAsyncIteration
            if not self._counted:
                delivery.attempts = 1
                return delivery
            if await past_deadline(delivery):
                continue
            await delivery.count()
            if not await past_limit(delivery, self._on_dead):
                return delivery

    async def cancel(self) -> None:
        if self._tag is None:
            return
        tag, self._tag = self._tag, None
        await self._queue.cancel(tag)
        await self._end()

    async def _end(self) -> None:
        """No consumer left: what was received and not handed out goes back, the iteration ends,
        and the channel closes once every delivery handed out is settled."""
        self._cancelled = True
        while not self._buffer.empty():
            pending = self._buffer.get_nowait()
            if pending is not None:
                await pending.reject(requeue=True)
        self._buffer.put_nowait(None)
        if self._unsettled == 0:
            await self._close_channel()


class QuorumSubscription(RabbitSubscription):
    """A subscription to a quorum queue, which takes no channel-wide prefetch: the limit is kept with
    consumers on the channel, each with a prefetch of its own (fixed when it starts).

    What it may hold at once (its capacity) is the active consumers' prefetches plus what cancelled
    ones still hold unsettled. A new limit cancels every active consumer and starts one with the
    difference (none while what is held fills it); once what the cancelled ones held is settled, a
    consumer with the rest starts beside the active one. So it never holds more than the limit, and
    holds less only until the messages taken before a change are settled."""

    def __init__(
        self,
        channel: AbstractChannel,
        queue: AbstractQueue,
        prefetch: int,
        *,
        bus: RabbitBus | None = None,
        counted: bool = False,
        on_dead: OnDead | None = None,
    ) -> None:
        super().__init__(channel, queue, bus=bus, counted=counted, on_dead=on_dead)
        self._limit = prefetch
        self._active: dict[str, int] = {}  # consumer tag -> its prefetch
        self._held: dict[str, int] = {}  # consumer tag -> its deliveries not settled yet
        self._fitting = asyncio.Lock()
        channel.reopen_callbacks.add(self._reopened)  # type: ignore[attr-defined]  # a robust channel's

    @property
    def held_by_cancelled(self) -> int:
        return sum(n for tag, n in self._held.items() if tag not in self._active)

    @property
    def capacity(self) -> int:
        return sum(self._active.values()) + self.held_by_cancelled

    async def start(self) -> None:
        await self._fit()

    async def set_prefetch(self, count: int) -> None:
        if count != self._limit:
            self._limit = count
            await self._fit(resize=True)

    async def _fit(self, *, resize: bool = False) -> None:
        async with self._fitting:
            if self._cancelled:
                return
            if resize and self._active:
                for tag in list(self._active):
                    del self._active[tag]
                    await self._queue.cancel(tag)
            room = self._limit - self.capacity
            if room > 0 and (not self._active or self.held_by_cancelled == 0):
                await self._channel.set_qos(prefetch_count=room)
                tag = await self._queue.consume(self._on_message)
                self._active[tag] = room
                self._tag = tag

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._cancelled:
            await message.reject(requeue=True)
            return
        tag = message.consumer_tag or ""
        self._held[tag] = self._held.get(tag, 0) + 1
        self._unsettled += 1

        async def settled() -> None:
            self._held[tag] = max(self._held.get(tag, 0) - 1, 0)
            if not self._held[tag] and tag not in self._active:
                del self._held[tag]
            await self._settled()
            if tag not in self._active:  # what a cancelled consumer held frees room
                await self._fit()

        await self._buffer.put(
            RabbitDelivery(message, on_settled=settled, queue=self._queue.name, bus=self._bus, counted=self._counted)
        )

    def _reopened(self, *_: object) -> None:
        """A new channel: what the old one held went back to the queue; the client restored the
        active consumers."""
        self._held = {tag: 0 for tag in self._active}

    async def cancel(self) -> None:
        if self._cancelled:
            return
        async with self._fitting:
            for tag in list(self._active):
                await self._queue.cancel(tag)
            self._active.clear()
            self._tag = None
        await self._end()


QUEUE_TYPES = ("classic", "quorum")
BROKER_DELIVERY_LIMIT_FACTOR = 4  # quorum queues: the broker's limit is this many times the counted one


RECONNECT_INTERVAL_S = 1  # a lost connection is tried again this often (the client's default: 5 s)
REDECLARE_AFTER_S = 2.0  # a work queue deleted under its consumer is declared again by it after this long
DEFAULT_HEARTBEAT_S = 10  # a peer that stops answering is dropped after two missed: ~20 s


def with_heartbeat(url: str, seconds: float | None) -> str:
    """``url`` asking for an AMQP heartbeat of ``seconds`` unless it names one itself. (The
    client's own default, 60 s, is what the broker agrees to otherwise, and a worker cut off from
    the broker keeps its unacknowledged messages for two minutes.)"""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if seconds is None or "heartbeat" in query:
        return url
    query["heartbeat"] = str(int(seconds))
    return urlunsplit(parts._replace(query=urlencode(query)))


class RabbitBus:
    """One robust connection; a publishing channel with confirms, one channel per consumer."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        publisher: AbstractChannel,
        dead_exchange: str,
        dead_queue: str = "",
        *,
        attempts: Attempts | None = None,
        delivery_limit: int = DELIVERY_LIMIT,
        dead_queue_max: int = DEAD_QUEUE_MAX,
        owned_store: Store | None = None,
        queue_type: str = "classic",
    ) -> None:
        if queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue_type must be one of {QUEUE_TYPES}, got {queue_type!r}")
        self.queue_type = queue_type
        self._connection = connection
        self._publisher = publisher
        self._dead_exchange = dead_exchange
        self._dead_queue = dead_queue
        self._exchanges: dict[str, AbstractExchange] = {}
        self.attempts = attempts
        self.delivery_limit = delivery_limit
        self.dead_queue_max = dead_queue_max
        self._owned_store = owned_store  # a store opened for the counter alone, closed with the bus
        self._declared: dict[str, bool] = {}  # queues this bus declared -> exclusive
        self._on_lost: list[OnLost] = []
        self._tasks: set[asyncio.Future[None]] = set()

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        dead_exchange: str,
        dead_queue: str,
        heartbeat_s: float | None = DEFAULT_HEARTBEAT_S,
        attempts: Attempts | None = None,
        delivery_limit: int = DELIVERY_LIMIT,
        dead_queue_max: int = DEAD_QUEUE_MAX,
        owned_store: Store | None = None,
        queue_type: str = "classic",
    ) -> RabbitBus:
        """``attempts``: where redeliveries are counted (None: a redelivery counts as attempt 2);
        ``queue_type``: classic, or quorum (replicated, with the broker's delivery limit)."""
        connection = await aio_pika.connect_robust(
            with_heartbeat(url, heartbeat_s), reconnect_interval=RECONNECT_INTERVAL_S
        )
        publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
        bus = cls(
            connection,
            publisher,
            dead_exchange,
            dead_queue,
            attempts=attempts,
            delivery_limit=delivery_limit,
            dead_queue_max=dead_queue_max,
            owned_store=owned_store,
            queue_type=queue_type,
        )
        await bus._declare_dead_letters(dead_exchange, dead_queue)
        connection.reconnect_callbacks.add(bus._reconnected)
        return bus

    # ---- topology that heals: what the broker lost is declared again, and services are told
    def on_lost(self, callback: OnLost) -> None:
        self._on_lost.append(callback)

    def _tell_lost(self, queue: str) -> None:
        for callback in self._on_lost:
            try:
                callback(queue)
            except Exception:  # a listener's fault must not stop the others
                log.exception("a topology-lost listener failed")

    def _reconnected(self, *_: object) -> None:
        """A new connection: the client has declared its robust queues and exchanges again; what
        the old one's exclusive queues held is gone."""
        log.warning("broker connection re-established: topology declared again")
        self._tell_lost("")

    def _consumer_cancelled(self, queue: str) -> None:
        """The broker cancelled our consumer: ``queue`` was deleted. An exclusive queue of ours
        comes back at once (the client declares it again to restore the consumer); a work queue is
        declared again after ``REDECLARE_AFTER_S`` unless its publisher did so first (which then
        re-publishes what it held), and the consumer resumes on it."""
        log.warning("queue %s deleted on the broker: declaring it again", queue)
        self._tell_lost(queue)
        if queue in self._declared and not self._declared[queue]:
            self._background(self._redeclare_later(queue))

    async def _redeclare_later(self, queue: str) -> None:
        await asyncio.sleep(REDECLARE_AFTER_S)  # a grace for the publisher, which re-publishes on declaring
        try:
            await self.declare_queue(queue)
        except Exception as exc:  # an outage: the reconnect declares it
            log.warning("queue %s not declared again (%r)", queue, exc)

    async def _watch_cancel(self, channel: AbstractChannel, queue: str) -> None:
        """Hear the broker cancel this channel's consumer, on each channel the client opens for
        it (a reconnect opens a new one)."""

        async def hook() -> None:
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(lambda _frame: self._consumer_cancelled(queue))

        def rehook(*_: object) -> None:
            self._background(hook())

        await hook()
        channel.reopen_callbacks.add(rehook)  # type: ignore[attr-defined]  # a robust channel's

    def _background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def exists(self, queue: str) -> bool:
        """Whether the broker has ``queue`` (an exclusive one of another connection counts)."""
        try:
            async with self._scratch() as channel:
                await channel.declare_queue(queue, passive=True)
        except ChannelLockedResource:
            pass  # exclusive to another connection: there all the same
        except ChannelNotFoundEntity:
            return False
        return True

    @contextlib.asynccontextmanager
    async def _scratch(self) -> AsyncIterator[AbstractChannel]:
        """A channel for one question whose answer may close it (a passive declare, a delete)."""
        channel = await self._connection.channel()
        try:
            yield channel
        finally:
            if not channel.is_closed:
                await channel.close()

    def _type_arguments(self) -> FieldTable:
        """Arguments of every durable queue for the queue type: a quorum queue's type, and the
        broker's delivery limit (a backstop: it counts every return, give-backs too, so it sits
        above the counted ``delivery_limit``)."""
        if self.queue_type == "classic":
            return {}
        return {"x-queue-type": "quorum", "x-delivery-limit": self.delivery_limit * BROKER_DELIVERY_LIMIT_FACTOR}

    def _dead_arguments(self) -> FieldTable:
        return {"x-max-length": self.dead_queue_max, "x-overflow": "drop-head", **self._type_arguments()}

    async def _declare_dead_letters(self, exchange: str, queue: str) -> None:
        """The dead-letter exchange and the bounded dead queue bound to it. A dead queue declared
        before it was bounded (other arguments: PRECONDITION_FAILED) is replaced while it is
        empty; otherwise it is kept as it is, unbounded, until emptied (`exegpt dlq purge`, or
        replayed), and a warning says so."""
        await self._publisher.declare_exchange(exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        for _ in range(2):
            channel = await self._connection.channel()
            try:
                dead = await channel.declare_queue(queue, durable=True, arguments=self._dead_arguments())
                await dead.bind(exchange)
                return
            except ChannelPreconditionFailed as exc:
                if _other_type(exc):
                    raise _mismatch(queue, self.queue_type, exc) from None
            finally:
                if not channel.is_closed:
                    await channel.close()
            if not await self._replace_unbounded(queue):
                break
        log.warning(
            "dead queue %s was declared without a length bound by an earlier version and holds "
            "messages: it stays unbounded until emptied (`exegpt dlq replay --all` or `exegpt dlq purge`)",
            queue,
        )
        channel = await self._connection.channel()
        try:
            dead = await channel.declare_queue(queue, passive=True)
            await dead.bind(exchange)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def _replace_unbounded(self, queue: str) -> bool:
        """Delete the old unbounded dead queue if it is empty; True when it was."""
        try:
            async with self._scratch() as channel:
                await channel.queue_delete(queue, if_empty=True)
            return True
        except ChannelPreconditionFailed:
            return False

    async def publish_dead(self, body: bytes, headers: Mapping[str, str], message_id: str) -> None:
        """Straight to the dead queue (confirmed), headers saying why."""
        message = aio_pika.Message(
            body, headers=dict(headers), message_id=message_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        try:
            await self._publisher.default_exchange.publish(message, routing_key=self._dead_queue, mandatory=True)
        except DeliveryError:
            raise Unroutable(self._dead_queue) from None

    async def declare_queue(self, name: str, *, exclusive: bool = False) -> None:
        self._declared[name] = exclusive
        await self._declare(self._publisher, name, exclusive)

    async def _declare(self, channel: AbstractChannel, name: str, exclusive: bool) -> AbstractQueue:
        if exclusive:
            return await channel.declare_queue(name, exclusive=True, auto_delete=True)
        arguments: FieldTable = {"x-dead-letter-exchange": self._dead_exchange, **self._type_arguments()}
        try:
            return await channel.declare_queue(name, durable=True, arguments=arguments)
        except ChannelPreconditionFailed as exc:
            raise _mismatch(name, self.queue_type, exc) from None

    async def declare_fanout(self, exchange: str) -> None:
        if exchange not in self._exchanges:
            self._exchanges[exchange] = await self._publisher.declare_exchange(
                exchange, aio_pika.ExchangeType.FANOUT, durable=True
            )

    async def publish(
        self, queue: str, body: bytes, *, headers: Mapping[str, str] | None = None, deadline: float | None = None
    ) -> None:
        check_name(queue)
        message = aio_pika.Message(
            body,
            headers=_table(with_deadline(headers, deadline)),
            message_id=uuid.uuid4().hex,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await self._publisher.default_exchange.publish(message, routing_key=queue, mandatory=True)
            return
        except DeliveryError:
            if queue not in self._declared:
                raise Unroutable(queue) from None
        log.warning("queue %s missing on the broker: declaring it again", queue)
        await self.declare_queue(queue, exclusive=self._declared[queue])
        self._tell_lost(queue)
        try:
            await self._publisher.default_exchange.publish(message, routing_key=queue, mandatory=True)
        except DeliveryError:
            raise Unroutable(queue) from None

    async def broadcast(self, exchange: str, body: bytes) -> None:
        await self.declare_fanout(exchange)
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await self._exchanges[exchange].publish(message, routing_key="", mandatory=False)

    async def consume(
        self, queue: str, *, prefetch: int, auto_ack: bool = False, on_dead: OnDead | None = None
    ) -> RabbitSubscription:
        channel = await self._connection.channel()
        exclusive = bool(self._declared.get(queue))
        if self.queue_type == "quorum" and not exclusive and not auto_ack:
            declared = await channel.get_queue(queue, ensure=True)
            await self._watch_cancel(channel, queue)
            subscription: RabbitSubscription = QuorumSubscription(
                channel, declared, prefetch, bus=self, counted=queue != self._dead_queue, on_dead=on_dead
            )
            await subscription.start()
            return subscription
        # the channel's own limit (one consumer per channel): unlike a consumer's, it can change later
        await channel.set_qos(prefetch_count=prefetch, global_=self.queue_type == "classic" or exclusive)
        if exclusive:  # ours: declared on this channel, restored with the consumer
            declared = await self._declare(channel, queue, exclusive=True)
        else:
            declared = await channel.get_queue(queue, ensure=True)
        await self._watch_cancel(channel, queue)
        return await self._start(channel, declared, auto_ack, counted=queue != self._dead_queue, on_dead=on_dead)

    async def _start(
        self,
        channel: AbstractChannel,
        queue: AbstractQueue,
        auto_ack: bool = False,
        *,
        counted: bool = False,
        on_dead: OnDead | None = None,
    ) -> RabbitSubscription:
        subscription = RabbitSubscription(channel, queue, auto_ack, bus=self, counted=counted, on_dead=on_dead)
        await subscription.start()
        return subscription

    async def subscribe(self, exchange: str, queue: str) -> RabbitSubscription:
        await self.declare_fanout(exchange)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=1000)
        declared = await self._declare(channel, queue, exclusive=True)
        await declared.bind(exchange)
        await self._watch_cancel(channel, queue)
        return await self._start(channel, declared)

    async def queue_depth(self, queue: str) -> int:
        try:
            async with self._scratch() as channel:
                declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)
        except ChannelClosed:
            return 0

    async def delete(self, *, queues: list[str], exchanges: list[str]) -> None:
        channel = await self._connection.channel()
        for name in queues:
            await channel.queue_delete(name)
        for name in exchanges:
            await channel.exchange_delete(name)
        await channel.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._connection.close()
        if self._owned_store is not None:
            await self._owned_store.close()


def _other_type(exc: Exception) -> bool:
    return "x-queue-type" in str(exc)


def _mismatch(queue: str, queue_type: str, exc: Exception) -> TopologyMismatch:
    """The broker refused our declaration of ``queue``: it exists with other arguments."""
    return TopologyMismatch(
        f"queue {queue} exists on the broker with other arguments than a {queue_type} queue's ({exc}); "
        f"a queue cannot change its type: drain it and delete it (`exegpt down`), or set queue_type "
        f"to the type it has"
    )


def _table(headers: dict[str, str] | None) -> FieldTable | None:
    """Text headers as AMQP's field table (a dict whose values may be any field value)."""
    return None if headers is None else dict(headers)
