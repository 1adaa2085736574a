"""The gateway's side of the mesh: submit encode work, gather each request's events exactly once.

Any front end (the REST routes, batch jobs) submits through ``Gateway.submit`` and reads tokens
from the returned ``Pending``. Workers may repeat events after a redelivery; ``Pending`` keeps
each token index once and in order, and ends at the first finish or failure.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import assert_never

from common.config import MeshConfig
from common.lifecycle import Stage, Timeline
from common.messages import codec
from common.messages.control import Abort
from common.messages.events import EventBatch, EventMessage, Failure, Token
from common.messages.work import EncodeWork, Sampling
from common.names import ARRIVALS_TTL_S, Names, new_worker_id
from common.tracing import Attributes, tracing_for
from common.transport.connect import Transports
from common.transport.errors import Backoff, is_outage
from common.transport.port import Subscription
from engine.api import Tokenizer
from services.front.metrics import Metrics

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 5.0  # a broker that has not confirmed a publish by then counts as down
ARRIVALS_FLUSH_S = 0.5  # arrivals counted per second go to the store this often (one write per past second)
ARRIVALS_KEPT_S = 60  # seconds of counts kept while the store does not answer


@dataclass(frozen=True)
class ServedModel:
    """The model a front end serves: the name clients give, its tokenizer, its context in tokens."""

    name: str
    tokenizer: Tokenizer
    max_context: int


class RequestFailed(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Pending:
    """One submitted request as its submitter sees it."""

    request_id: str
    prompt_len: int
    timeline: Timeline = field(default_factory=Timeline)
    next_index: int = 0
    held: dict[int, Token] = field(default_factory=dict)
    done: bool = False
    failed: Failure | None = None
    work: EncodeWork | None = None  # what was published, to publish again if the broker lost it
    # epoch seconds, set once when it is submitted: its client stops waiting then (504), and its
    # work is dropped unread wherever it is (the messages carry it); epoch, as other hosts compare it
    deadline: float = math.inf
    timeout_s: float = math.inf  # the deadline's distance from its submission, for the 504's text
    headers: dict[str, str] | None = None
    _out: deque[Token | Failure] = field(default_factory=deque)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def on_token(self, token: Token) -> bool:
        """Keep a token once; release tokens in index order. True when the request just finished."""
        if self.done or token.index < self.next_index:
            return False
        self.held.setdefault(token.index, token)
        while self.next_index in self.held and not self.done:
            released = self.held.pop(self.next_index)
            self._release(released)
        return self.done

    def _release(self, token: Token) -> None:
        if self.next_index == 0:
            self.timeline.mark(Stage.FIRST_TOKEN)
        self.next_index += 1
        self.timeline.output_tokens = self.next_index
        self.done = token.finished
        if self.done:
            self.timeline.mark(Stage.FINISHED)
        self._push(token)

    def _push(self, item: Token | Failure) -> None:
        self._out.append(item)
        self._arrived.set()

    def on_failure(self, failure: Failure) -> bool:
        if self.done:
            return False
        self.done, self.failed = True, failure
        self._push(failure)
        return True

    async def tokens(self) -> AsyncIterator[Token]:
        """Tokens in order until the last; RequestFailed on a failure, or a 504 at its deadline."""
        while True:
            if not self._out:  # wait only when nothing is queued (a chunk arrives all at once)
                self._arrived.clear()
                left = self.deadline - time.time()
                try:
                    await asyncio.wait_for(self._arrived.wait(), max(left, 0) if math.isfinite(left) else None)
                except TimeoutError:
                    raise RequestFailed(504, f"no result within {self.timeout_s:g} s") from None
            item = self._out.popleft()
            if isinstance(item, Failure):
                raise RequestFailed(item.status, item.message)
            yield item
            if item.finished:
                return


class Gateway:
    """Owns the events queue of this process and the table of pending requests."""

    def __init__(self, config: MeshConfig, transports: Transports, model: str, metrics: Metrics | None = None) -> None:
        self.config = config
        self.names = Names(config.namespace)
        self.transports = transports
        self.bus = transports.bus
        self.model = model
        self.metrics = metrics or Metrics()
        self.gateway_id = new_worker_id(config, "gateway")
        self.events_queue = self.names.events_queue(self.gateway_id)
        self.pending: dict[str, Pending] = {}
        self.tracing = tracing_for(config)
        self._pump: asyncio.Task[None] | None = None
        self.arrivals: Counter[int] = Counter()  # requests accepted per unix second, not yet in the store
        self._flusher: asyncio.Task[None] | None = None
        self.routable = True  # the queues a request needs exist (``/health/ready`` says so)
        self.republished = 0  # requests published again after the broker lost a queue
        self._lost = asyncio.Event()
        self.restored = asyncio.Event()  # set each time a lost queue was declared again and requests re-published
        self._keeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._declare()
        subscription = await self.bus.consume(
            self.events_queue, prefetch=1000, auto_ack=True
        )  # events die with this process anyway
        self.bus.on_lost(self._on_lost)
        self._pump = asyncio.create_task(self._receive_events(subscription))
        self._flusher = asyncio.create_task(self._flush_arrivals())
        self._keeper = asyncio.create_task(self._keep_topology())

    async def _declare(self) -> None:
        await self.bus.declare_queue(self.names.encode_queue)
        await self.bus.declare_fanout(self.names.abort_exchange)
        await self.bus.declare_queue(self.events_queue, exclusive=True)

    # ==== topology that heals =====================================================================
    def _on_lost(self, queue: str) -> None:
        """The bus says messages may have gone with ``queue`` ("": a new connection)."""
        if queue in ("", self.names.encode_queue, self.events_queue):
            self.routable = False
            self._lost.set()

    async def _keep_topology(self) -> None:
        """Every ``topology_check_s``, or at once when the bus reports a loss: while the encode
        queue or this gateway's events queue is missing, not routable; declare them again and
        publish every pending request again (its work, or its events, may have gone with the
        queue). Each request stays this gateway's until done or past its deadline."""
        backoff = Backoff()
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), self.config.topology_check_s)
            except TimeoutError:
                pass  # the periodic check: a queue deleted while nobody published or consumed
            try:
                if not self._lost.is_set() and await self._all_exist():
                    self.routable = True
                    continue
                self.routable = False
                self._lost.clear()
                await self._declare()
                await self._republish()
                self.routable = await self._all_exist()
                self.restored.set()
                backoff.reset()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self.routable = False
                self._lost.set()  # tried again after the wait
                log.warning("gateway %s: topology not restored (%r); trying again", self.gateway_id, exc)
                await asyncio.sleep(backoff.next_s())  # an outage's backoff

    async def _all_exist(self) -> bool:
        return await self.bus.exists(self.names.encode_queue) and await self.bus.exists(self.events_queue)

    async def _republish(self) -> None:
        """Publish each pending request again, with its own deadline. Tokens its client already
        has are not repeated (``Pending`` keeps each index once), and a worker that still holds
        it drops the copy."""
        now, count = time.time(), 0
        for pending in list(self.pending.values()):
            if pending.done or pending.work is None or pending.deadline <= now:
                continue
            await self._publish(self.names.encode_queue, codec.encode(pending.work), pending.headers, pending.deadline)
            count += 1
        self.republished += count
        log.warning("gateway %s: topology restored; %d pending requests published again", self.gateway_id, count)

    async def close(self) -> None:
        for task in (self._pump, self._flusher, self._keeper):
            if task is not None:
                await stop(task)
        await self.flush_arrivals(until=None)
        await self.transports.close()

    async def _flush_arrivals(self) -> None:
        while True:
            await asyncio.sleep(ARRIVALS_FLUSH_S)  # a periodic write, not a synchronisation
            await self.flush_arrivals()

    async def flush_arrivals(self, until: int | None = -1) -> None:
        """Add the arrivals counted in each whole second before ``until`` (-1: the second under
        way; None: every second) to the store's per-second counters, which the scheduler's
        arrival forecast reads. A store that does not answer keeps them here (the last minute)."""
        now = int(time.time())
        last = now if until == -1 else (until if until is not None else now + 1)
        for second in sorted(s for s in self.arrivals if s < last):
            count = self.arrivals.pop(second)
            if second < now - ARRIVALS_KEPT_S:
                continue
            try:
                await self.transports.store.add(self.names.arrivals(second), count, ttl_s=ARRIVALS_TTL_S)
            except Exception as exc:  # an outage: counted again at the next flush
                self.arrivals[second] += count
                log.debug("arrival counts not stored (%r); kept for the next flush", exc)
                return

    async def submit(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        request_id: str | None = None,
        *,
        stream: bool = True,
        timeout_s: float | None = None,
    ) -> Pending:
        """Queue one tokenized prompt for encoding; its events arrive on ``Pending``.

        ``stream=False`` lets decoders send the tokens in chunks (fewer messages, same result).
        ``timeout_s`` (default ``request_timeout_s``) sets the request's one deadline.
        """
        rid = request_id or f"cmpl-{uuid.uuid4().hex}"
        timeout = self.config.request_timeout_s if timeout_s is None else timeout_s
        pending = Pending(rid, len(prompt_ids), deadline=time.time() + timeout, timeout_s=timeout)
        pending.timeline.mark(Stage.ARRIVED)
        self.pending[rid] = pending
        self.metrics.in_flight.inc()
        self.arrivals[int(time.time())] += 1
        work = EncodeWork(rid, self.model, tuple(prompt_ids), sampling, self.events_queue, time.time(), stream)
        try:
            await self._publish_work(pending, work)
        except BaseException:
            self.forget(pending)
            raise
        pending.timeline.mark(Stage.QUEUED)
        if pending.done and pending.failed is None:  # it finished before the broker's confirm came
            self.metrics.finished(pending.timeline)
        return pending

    async def _publish_work(self, pending: Pending, work: EncodeWork) -> None:
        """Publish to the encode queue, with the request's deadline (after it this gateway answers
        504, and the work is dropped unread wherever it is); traced, in a span under the current
        one (the HTTP request's) whose context the message's headers carry to the worker."""
        queue, body = self.names.encode_queue, codec.encode(work)
        pending.work = work
        if not self.tracing.enabled:
            await self._publish(queue, body, None, pending.deadline)
            return
        attributes: Attributes = {
            "exegpt.request_id": work.request_id,
            "messaging.destination.name": queue,
            "exegpt.prompt_tokens": len(work.prompt_ids),
        }
        with self.tracing.span("publish encode", kind="producer", attributes=attributes):
            pending.headers = self.tracing.inject()
            await self._publish(queue, body, pending.headers, pending.deadline)

    async def _publish(self, queue: str, body: bytes, headers: dict[str, str] | None, deadline: float) -> None:
        """One confirmed publish of encode work, bounded by ``PUBLISH_TIMEOUT_S`` (TimeoutError)."""
        await asyncio.wait_for(self.bus.publish(queue, body, headers=headers, deadline=deadline), PUBLISH_TIMEOUT_S)

    async def abort(self, pending: Pending) -> None:
        """The client went away: forget the request and tell the workers to drop it. A broker
        that cannot take the abort is logged, not raised: the work's deadline ends it anyway."""
        if self.pending.pop(pending.request_id, None) is not None:
            self.metrics.in_flight.dec()
            body = codec.encode(Abort(pending.request_id))
            try:
                await asyncio.wait_for(self.bus.broadcast(self.names.abort_exchange, body), PUBLISH_TIMEOUT_S)
            except Exception as exc:
                log.warning(
                    "abort of %s not sent (%s: %s); the work expires by its deadline",
                    pending.request_id,
                    type(exc).__name__,
                    exc,
                )

    def forget(self, pending: Pending) -> None:
        if self.pending.pop(pending.request_id, None) is not None:
            self.metrics.in_flight.dec()

    async def _receive_events(self, subscription: Subscription) -> None:
        async for delivery in subscription:
            try:
                self.on_event(codec.decode(delivery.body, EventMessage))
            except codec.DecodeError:
                pass  # not ours to redeliver: events queues have no dead letters
            except Exception:  # one bad event must not stop the pump every pending request waits on
                log.exception("gateway %s: an event could not be handled; going on", self.gateway_id)

    def on_event(self, message: EventMessage) -> None:
        if isinstance(message, EventBatch):
            self.on_event_batch(message)
        else:
            assert_never(message)

    def on_event_batch(self, batch: EventBatch) -> None:
        self.metrics.batch_size.labels(batch.role).observe(batch.batch_size)
        for stamp in batch.stamps:
            if (pending := self.pending.get(stamp.request_id)) is not None:
                pending.timeline.mark(stamp.stage, stamp.at)
        for token in batch.tokens:
            if (pending := self.pending.get(token.request_id)) is not None and pending.on_token(token):
                self._finished(pending)
        for failure in batch.failures:
            if (pending := self.pending.get(failure.request_id)) is not None and pending.on_failure(failure):
                self.forget(pending)

    def _finished(self, pending: Pending) -> None:
        if Stage.QUEUED in pending.timeline.stamps:  # else submit records it once queued
            self.metrics.finished(pending.timeline)
        self.forget(pending)


STOP_RETRY_S = 1.0  # a task not ended this long after its cancel is cancelled again


async def stop(task: asyncio.Task) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling it again every ``STOP_RETRY_S``: a
    cancel can be swallowed (Python 3.11's ``asyncio.wait_for`` returns the result instead when
    both come in one turn of the loop, as when a loss wakes the topology keeper just as the
    gateway closes), and a loop that goes on after it would hold ``close`` for ever."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_RETRY_S)
    if not task.cancelled():
        task.exception()  # retrieved: how a stopped task ended is of no further interest
