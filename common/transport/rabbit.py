"""The bus over RabbitMQ (aio-pika): robust connection, publisher confirms, per-consumer prefetch.

Work queues are durable, messages persistent, and a message rejected without requeue is routed by
the queue's dead-letter exchange to the dead queue. Each consumer has its own channel so that its
prefetch (``basic.qos``, set on the channel, so that it can change while consuming) bounds only
its own unacked messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelClosed, DeliveryError

from common.transport.port import Unroutable


class RabbitDelivery:
    def __init__(self, message: AbstractIncomingMessage, settled: bool = False,
                 on_settled: Callable[[], Awaitable[None]] | None = None) -> None:
        self.body = message.body
        self.redelivered = bool(message.redelivered)
        self._message = message
        self._settled = settled
        self._on_settled = on_settled
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> Mapping[str, str]:
        """The message's text headers; values that came as bytes are decoded (UTF-8), others
        (tables, numbers: the broker's own, such as ``x-death``) are left out. Read on first use."""
        if self._headers is None:
            self._headers = {key: value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                             for key, value in (self._message.headers or {}).items()
                             if isinstance(value, (str, bytes))}
        return self._headers

    async def ack(self) -> None:
        if not self._settled:
            self._settled = True
            await self._message.ack()
            await self._done()

    async def reject(self, *, requeue: bool) -> None:
        if not self._settled:
            self._settled = True
            await self._message.reject(requeue=requeue)
            await self._done()

    async def _done(self) -> None:
        if self._on_settled is not None:
            await self._on_settled()


class RabbitSubscription:
    """One consumer on its own channel. Cancelled, it closes the channel once every delivery it
    handed out is settled (closing earlier would give the broker back messages still being
    worked on), so consumers that come and go (a worker changing role) leave no channel behind."""

    def __init__(self, channel: AbstractChannel, queue: AbstractQueue, auto_ack: bool = False) -> None:
        self._channel, self._queue, self._auto_ack = channel, queue, auto_ack
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
            await self._buffer.put(RabbitDelivery(message, settled=True))
        else:
            self._unsettled += 1
            await self._buffer.put(RabbitDelivery(message, on_settled=self._settled))

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

    def __aiter__(self) -> "RabbitSubscription":
        return self

    async def __anext__(self) -> RabbitDelivery:
        delivery = await self._buffer.get()
        if delivery is None:
            raise StopAsyncIteration
        return delivery

    async def cancel(self) -> None:
        if self._tag is None:
            return
        tag, self._tag = self._tag, None
        await self._queue.cancel(tag)
        self._cancelled = True
        while not self._buffer.empty():
            pending = self._buffer.get_nowait()
            if pending is not None:
                await pending.reject(requeue=True)
        self._buffer.put_nowait(None)
        if self._unsettled == 0:
            await self._close_channel()


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

    def __init__(self, connection: AbstractRobustConnection, publisher: AbstractChannel,
                 dead_exchange: str) -> None:
        self._connection = connection
        self._publisher = publisher
        self._dead_exchange = dead_exchange
        self._exchanges: dict[str, AbstractExchange] = {}

    @classmethod
    async def connect(cls, url: str, *, dead_exchange: str, dead_queue: str,
                      heartbeat_s: float | None = DEFAULT_HEARTBEAT_S) -> "RabbitBus":
        connection = await aio_pika.connect_robust(with_heartbeat(url, heartbeat_s))
        publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
        bus = cls(connection, publisher, dead_exchange)
        await bus._declare_dead_letters(dead_exchange, dead_queue)
        return bus

    async def _declare_dead_letters(self, exchange: str, queue: str) -> None:
        dlx = await self._publisher.declare_exchange(exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        dead = await self._publisher.declare_queue(queue, durable=True)
        await dead.bind(dlx)

    async def declare_queue(self, name: str, *, exclusive: bool = False) -> None:
        await self._declare(self._publisher, name, exclusive)

    async def _declare(self, channel: AbstractChannel, name: str, exclusive: bool) -> AbstractQueue:
        if exclusive:
            return await channel.declare_queue(name, exclusive=True, auto_delete=True)
        arguments = {"x-dead-letter-exchange": self._dead_exchange}
        return await channel.declare_queue(name, durable=True, arguments=arguments)

    async def declare_fanout(self, exchange: str) -> None:
        if exchange not in self._exchanges:
            self._exchanges[exchange] = await self._publisher.declare_exchange(
                exchange, aio_pika.ExchangeType.FANOUT, durable=True)

    async def publish(self, queue: str, body: bytes, *, headers: Mapping[str, str] | None = None) -> None:
        message = aio_pika.Message(body, headers=dict(headers) if headers else None,
                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        try:
            await self._publisher.default_exchange.publish(message, routing_key=queue, mandatory=True)
        except DeliveryError:
            raise Unroutable(queue) from None

    async def broadcast(self, exchange: str, body: bytes) -> None:
        await self.declare_fanout(exchange)
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await self._exchanges[exchange].publish(message, routing_key="", mandatory=False)

    async def consume(self, queue: str, *, prefetch: int, auto_ack: bool = False) -> RabbitSubscription:
        channel = await self._connection.channel()
        # the channel's own limit (one consumer per channel): unlike a consumer's, it can change later
        await channel.set_qos(prefetch_count=prefetch, global_=True)
        declared = await channel.get_queue(queue, ensure=True)
        return await self._start(channel, declared, auto_ack)

    async def _start(self, channel: AbstractChannel, queue: AbstractQueue,
                     auto_ack: bool = False) -> RabbitSubscription:
        subscription = RabbitSubscription(channel, queue, auto_ack)
        await subscription.start()
        return subscription

    async def subscribe(self, exchange: str, queue: str) -> RabbitSubscription:
        await self.declare_fanout(exchange)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=1000)
        declared = await self._declare(channel, queue, exclusive=True)
        await declared.bind(exchange)
        return await self._start(channel, declared)

    async def queue_depth(self, queue: str) -> int:
        channel = await self._connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)
        except ChannelClosed:
            return 0
        finally:
            if not channel.is_closed:
                await channel.close()

    async def delete(self, *, queues: list[str], exchanges: list[str]) -> None:
        channel = await self._connection.channel()
        for name in queues:
            await channel.queue_delete(name)
        for name in exchanges:
            await channel.exchange_delete(name)
        await channel.close()

    async def close(self) -> None:
        await self._connection.close()
