"""How a request leaves a worker: settled (finished, its record written), refused, handed off to
a decoder, given back to its queue, or released; and the events sent on its behalf."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from common.messages import codec
from common.messages.handoff import KvReady
from common.messages.status import LengthSample
from common.transport.errors import Backoff, is_outage
from common.transport.port import (
    REENCODED_HEADER,
    Unroutable,
)
from engine.api import KVHandoff
from services.hosting.handoffs import kv_payload
from services.worker.base import WorkerBase
from services.worker.mailbox import Outbox
from services.worker.requests import Held

ABORTED_REMEMBERED = 10_000
EVENTS_GRACE_S = 2.0  # a missing events queue is tried this long (its gateway may be declaring it again)

# the worker's lines keep one logger name, whichever of its modules writes them
log = logging.getLogger("services.worker.worker")


def failed_task(task: asyncio.Task) -> bool:
    return task.done() and not task.cancelled() and task.exception() is not None


class Exits(WorkerBase):
    """Methods of ``services.worker.worker.Worker``: they use its state."""

    async def _settle(self, held: Held, reason: str, published: list[asyncio.Task[None]]) -> None:
        """After its events are confirmed: mark done once, record the request, drop its KV, ack.
        A store that does not answer delays the record, not the ack (``records``)."""
        await asyncio.gather(*held.sent, *published)
        rid = held.request_id
        sample = None  # aborted lengths would skew the scheduler's statistics
        if reason != "abort":
            sample = codec.encode(
                LengthSample(
                    rid,
                    len(held.prompt_ids),
                    len(held.generated),
                    reason,
                    time.time(),
                    held.submitted_at,
                    held.encode_start_at,
                    held.first_token_at,
                    self.follower.version,
                    self.worker_id,
                )
            )
        drops = [self.kv.drop(held.ready.kv_ref)] if held.ready is not None else []
        outcomes = await asyncio.gather(self.records.write(rid, sample), *drops, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not is_outage(outcome):
                raise outcome
        if isinstance(outcomes[0], BaseException):  # the store is out: its answer went, its record waits
            self.records.keep(rid, sample)
        await held.delivery.ack()  # (a KV payload left behind expires with its TTL)
        await self._free_slot(held)

    async def _free_slot(self, held: Held) -> None:
        """A request that held a decode credit is gone: an encoder's that it encoded (finished at
        prefill or refused in its step) or a decoder's hand-off (finished, aborted, refused).
        A request still queued on an encoder (aborted, expired, refused) never took one: it gives
        nothing back, or hand-offs could outnumber the decoders' free slots."""
        if held.credit or (held.ready is not None and self.role == "decoder"):
            held.credit = False
            await self.credits.grant(self.follower.version, 1)

    async def _refuse(self, held: Held, published: list[asyncio.Task[None]], dead: str | None) -> None:
        """A request this worker cannot run: its failure went out; its message is acked (``dead``
        None: bad input) or goes to the dead queue with ``dead`` as the reason."""
        await asyncio.gather(*published)
        if dead is None:
            await held.delivery.ack()
        else:
            await held.delivery.dead_letter(dead)
        await self._free_slot(held)

    async def _give_back(self, held: Held) -> None:
        await held.delivery.reject(requeue=True)
        await self._free_slot(held)

    async def _hand_off(self, held: Held, handoff: KVHandoff, published: list[asyncio.Task[None]]) -> None:
        """Store the KV cache, tell the decoders, then ack what brought the request here."""
        self._end_decode_span(held, "handed_off")  # leaving a decoding role with it running
        with self.tracing.span(
            "publish handoff", parent=held.trace, kind="producer", attributes=self._span_attributes(held)
        ):
            ref = await self.kv.put(kv_payload(handoff), producer=self.worker_id, ttl_s=self.config.kv_ttl_s)
            ready = KvReady(
                held.request_id,
                self.worker_id,
                held.reply_to,
                ref,
                len(held.prompt_ids),
                self.follower.version,
                held.submitted_at,
                held.stream,
                None if REENCODED_HEADER in held.delivery.headers else held.continuation(self.config.model),
            )
            await self.bus.publish(
                self.names.handoff_queue, codec.encode(ready), headers=self.tracing.inject(), deadline=held.deadline
            )
        await asyncio.gather(*held.sent, *published)
        await held.delivery.ack()

    # ==== tracing (common.tracing; off: none of this runs) ========================================
    def _keep(self, work: Coroutine[Any, Any, None], held: Held | None = None) -> None:
        """Run ``work`` (a request leaving this worker) in the background. If it fails (the broker
        or the store went away half-way), the request's message goes back to its queue where that
        is still possible (otherwise the broker returns it when the connection is gone) and its
        decode slot is freed: nothing stays held by a request that has left."""
        task = asyncio.create_task(work)
        self._background.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._background.discard(task)
            exc = None if task.cancelled() else task.exception()
            if exc is None:
                return
            log.warning(
                "worker %s: a request could not be settled (%r); it goes back to its queue", self.worker_id, exc
            )
            if held is not None:
                self._keep(self._release(held, counted=not is_outage(exc)))

        task.add_done_callback(done)

    async def _release(self, held: Held, *, counted: bool) -> None:
        """After a failed settle: requeue the message and free the slot, each as far as possible.
        A settle that failed because the broker or the store went away is not the request's
        fault, so it does not count against its delivery limit (``counted`` False): a request
        caught by a few reconnections in a row is not dead-lettered for them."""
        requeue = held.delivery.reject(requeue=True) if counted else held.delivery.release()
        for step in (requeue, self._free_slot(held)):
            try:
                await step
            except Exception as exc:  # the connection is gone: the broker requeues it by itself
                log.info("worker %s: releasing %s: %r", self.worker_id, held.request_id, exc)

    # ==== outbound ===============================================================================
    async def send(self, outbox: Outbox) -> None:
        await asyncio.gather(*self.send_soon(outbox))

    def send_soon(self, outbox: Outbox) -> list[asyncio.Task[None]]:
        """Start publishing one EventBatch per submitter; a submitter that vanished is skipped."""
        batches = outbox.batches(self.worker_id, self.role, self.follower.version, len(self.driver.running))
        return [asyncio.create_task(self._publish_event(q, codec.encode(b))) for q, b in batches.items()]

    async def _publish_event(self, queue: str, body: bytes) -> None:
        """To a gateway's events queue. A queue that is missing may be one its gateway is declaring
        again (after the broker restarted, or an operator deleted it): tried again for
        ``EVENTS_GRACE_S``, then its gateway is taken as gone and the requests held here for it
        are dropped (a gateway that declared its queue again publishes its requests again). An
        outage raises (the request's settle fails, and it runs again from its queue)."""
        backoff = Backoff(first_s=0.1, cap_s=1.0)
        give_up = time.monotonic() + EVENTS_GRACE_S
        while True:
            try:
                await self.bus.publish(queue, body)
                return
            except Unroutable:
                if time.monotonic() >= give_up:
                    self._drop_for(queue)
                    return
            # a retry's backoff while the gateway comes back; the last try at the grace's end
            await asyncio.sleep(min(backoff.next_s(), max(give_up - time.monotonic(), 0.0)))

    async def _gone(self, reply_to: str) -> bool:
        """Work for a gateway whose events queue was found gone is not started, unless the queue is
        back (its gateway declared it again, and publishes its requests again)."""
        if reply_to not in self.gone:
            return False
        try:
            back = await self.bus.exists(reply_to)
        except Exception as exc:
            if not is_outage(exc):
                raise
            return False  # the broker is out: run it, its events will tell
        if back:
            self.gone.pop(reply_to, None)
        return not back

    def _drop_for(self, queue: str) -> None:
        """Stop the work held for the gateway whose events queue is ``queue`` (it is gone); not
        remembered as aborted, so that work published again is taken."""
        self.gone[queue] = None
        while len(self.gone) > ABORTED_REMEMBERED:
            self.gone.pop(next(iter(self.gone)))
        dropped = [rid for rid, held in self.held.items() if held.reply_to == queue]
        if dropped:
            log.warning("worker %s: events queue %s is gone; dropping %d requests", self.worker_id, queue, len(dropped))
            self._abort_pending.extend(dropped)
            self.inbox.wake()
