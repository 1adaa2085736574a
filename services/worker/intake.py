"""A worker's intake: the deliveries it takes from its queues, decoded and admitted (or refused,
dead-lettered, skipped as done), and how much it asks its queues for."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol, TypeVar

from common.messages import codec
from common.messages.events import Failure
from common.messages.handoff import HandoffMessage, KvReady
from common.messages.work import WorkMessage
from common.transport.errors import is_outage
from common.transport.kv import CorruptPayload, KvPayload
from common.transport.port import (
    DEAD_HEADERS,
    REENCODED_HEADER,
    Delivery,
    NameTooLong,
    Subscription,
    check_name,
    failed,
    tell,
)
from engine.api import KVHandoff
from optimizer.policies import (
    QueuedRequest,
    RunningRequest,
    StepPlan,
    intake_prefetch,
)
from services.hosting.handoffs import engine_handoff
from services.hosting.sampling import engine_sampling
from services.worker.base import CREDIT_POLL_S, WorkerBase
from services.worker.mailbox import Outbox
from services.worker.requests import Held

GATHER_GAPS = 5  # an idle worker gathers a burst for at most this many gaps (MeshConfig.gather_s)

# the worker's lines keep one logger name, whichever of its modules writes them
log = logging.getLogger("services.worker.worker")


def dead_letter_message(reason: str) -> str:
    """What the client of a dead-lettered request is told."""
    return f"the request could not be processed and was moved to the dead queue: {reason}"


class _Addressed(Protocol):  # what every message a worker's queues carry names
    @property
    def request_id(self) -> str: ...

    @property
    def reply_to(self) -> str: ...


M = TypeVar("M", bound=_Addressed)  # the message a queue carries


class Intake(WorkerBase):
    """Methods of ``services.worker.worker.Worker``: they use its state."""

    async def _pump(self, queue: str, subscription: Subscription) -> None:
        async for delivery in subscription:
            self.inbox.put((queue, delivery))

    async def receive(self) -> None:
        """Deliveries since the last boundary become the driver's queued or incoming requests."""
        if self.stopping.is_set() and self._stop_deadline is None:
            await self._begin_stop()
        items = self.inbox.take()
        if not items:
            return
        now = time.monotonic()
        works = [d for q, d in items if q == self.names.encode_queue]
        handoffs = [d for q, d in items if q == self.names.handoff_queue]
        outbox = Outbox()
        too_large: list[Held] = []
        for held in await self._admit_work(works, outbox) + await self._admit_handoffs(handoffs, outbox):
            try:
                most = len(held.prompt_ids) + held.params.max_tokens  # KV positions it may come to hold
                request = (
                    QueuedRequest(held.request_id, held.input_len, now, most)
                    if held.handoff is None
                    else RunningRequest(held.request_id, len(held.prompt_ids), len(held.generated), most)
                )
                fits = self.driver.fits_alone(request)
            except Exception as exc:  # the per-message guard: this request only
                await failed(held.delivery, exc, self._on_dead)
                continue
            if not fits:
                outbox.failure(held.reply_to, Failure(held.request_id, 400, self._too_large(most)))
                too_large.append(held)
                continue
            self.held[held.request_id] = held
            if isinstance(request, QueuedRequest):  # work, to prefill here
                self.driver.enqueue(request)
                self._arrived.append((held.request_id, held.input_len))
            else:  # a hand-off, to decode
                self.driver.offer(request)
        await self.send(outbox)
        for held in too_large:  # work is acked; a hand-off goes to the dead queue and frees its credit
            await self._refuse(held, [], None if held.handoff is None else "too large for this worker's KV cache")

    def _too_large(self, positions: int) -> str:
        return (
            f"prompt + max_tokens need {positions} tokens of KV cache; a worker's cache holds "
            f"{self.driver.kv_tokens} (lower max_tokens, or give workers more memory: kv_cache_gb)"
        )

    async def _decoded(self, deliveries: list[Delivery], kind: type[M]) -> list[tuple[Delivery, M]]:
        """Each delivery with its message. To the dead queue, with the reason: bytes that do not
        decode (a requester that can still be named is told: a 400), and a message whose
        ``reply_to`` no broker can route (over 255 bytes: nobody could ever be answered)."""
        decoded: list[tuple[Delivery, M]] = []
        for delivery in deliveries:
            try:
                message = codec.decode(delivery.body, kind)
            except Exception as exc:  # codec.DecodeError, or anything a malformed message raises
                await self._tell_invalid(delivery, kind, exc)
                await delivery.dead_letter(f"undecodable: {exc}")
                continue
            try:
                check_name(message.reply_to)
            except NameTooLong as exc:
                await delivery.dead_letter(f"reply_to unusable: {exc}")
                continue
            decoded.append((delivery, message))
        return decoded

    async def _tell_invalid(self, delivery: Delivery, kind, exc: Exception) -> None:
        """A message that does not decode but names its request and a routable ``reply_to``:
        that request fails (400, the reason) before the message goes to the dead queue."""
        address = codec.return_address(delivery.body, kind)
        if address is None:
            return
        request_id, reply_to = address
        try:
            check_name(reply_to)
        except NameTooLong:
            return
        outbox = Outbox()
        outbox.failure(reply_to, Failure(request_id, 400, f"invalid request: {exc}"))
        try:
            await self.send(outbox)
        except Exception as failure:  # the broker is out: the dead queue still holds the reason
            log.warning("worker %s: invalid request %s could not be failed: %r", self.worker_id, request_id, failure)

    async def _on_dead(self, delivery: Delivery, reason: str) -> None:
        """A message is going to the dead queue (past the delivery limit, or failing at its last
        attempt): its request fails, with the reason, to its client."""
        try:
            message = codec.decode(delivery.body, WorkMessage | HandoffMessage)
            check_name(message.reply_to)
        except (codec.DecodeError, NameTooLong):
            return
        outbox = Outbox()
        outbox.failure(message.reply_to, Failure(message.request_id, 500, dead_letter_message(reason)))
        await self.send(outbox)

    async def _admit_work(self, deliveries: list[Delivery], outbox: Outbox) -> list[Held]:
        """Work that can run here; bad bytes are dead-lettered, and so is sampling the engine
        refuses (its request failing with a 400), other models' work fails (400), aborted or
        already finished work is acked."""
        kept: list[Held] = []
        for delivery, work in await self._decoded(deliveries, WorkMessage):
            if work.model != self.config.model:
                message = f"this mesh serves {self.config.model!r}, not {work.model!r}"
                outbox.failure(work.reply_to, Failure(work.request_id, 400, message))
                await self._ack_after(delivery, outbox)
            elif work.request_id in self.held or work.request_id in self.aborted or await self._gone(work.reply_to):
                await delivery.ack()
            else:
                try:
                    params = engine_sampling(work.sampling)
                except ValueError as exc:  # values the engine refuses: this request fails (400), nothing else
                    invalid = Outbox()
                    invalid.failure(work.reply_to, Failure(work.request_id, 400, f"invalid request: {exc}"))
                    await self.send(invalid)
                    await delivery.dead_letter(f"invalid sampling: {exc}")
                    continue
                try:
                    held = Held.from_work(delivery, work, params)
                    if self.tracing.enabled:
                        held.trace = self.tracing.extract(delivery.headers)
                except Exception as exc:  # the per-message guard: this request only
                    await failed(delivery, exc, self._on_dead)
                    continue
                kept.append(held)
        return await self._skip_done(kept)

    async def _admit_handoffs(self, deliveries: list[Delivery], outbox: Outbox) -> list[Held]:
        ready: list[tuple[Delivery, KvReady]] = []
        for delivery, message in await self._decoded(deliveries, HandoffMessage):
            if message.request_id in self.held or message.request_id in self.aborted:
                await delivery.ack()
            else:
                ready.append((delivery, message))
        fetch_start = time.time()
        payloads = await asyncio.gather(*(self.kv.get(m.kv_ref) for _, m in ready), return_exceptions=True)
        fetched = time.time()
        kept = []
        for (delivery, message), payload in zip(ready, payloads):
            handoff = _imported(message.kv_ref, payload)
            if isinstance(handoff, CorruptPayload):  # the same bytes fail everywhere: no retry
                reason = f"corrupt KV payload: {handoff}"
                await tell(self._on_dead, delivery, reason)
                await delivery.dead_letter(reason)
            elif isinstance(handoff, Exception):  # the store failing: a counted attempt
                log.warning("worker %s: hand-off %s: KV fetch failed: %r", self.worker_id, message.request_id, handoff)
                await failed(delivery, handoff, self._on_dead)
            elif isinstance(handoff, BaseException):
                raise handoff
            elif handoff is None:
                await self._kv_gone(delivery, message, outbox)
            else:
                try:
                    held = Held.from_handoff(delivery, message, handoff)
                    if self.tracing.enabled:  # the hand-off's receive: its KV cache fetched
                        held.trace = self.tracing.record(
                            "receive handoff",
                            parent=self.tracing.extract(delivery.headers),
                            start_s=fetch_start,
                            end_s=fetched,
                            kind="consumer",
                            attributes=self._span_attributes(held),
                        )
                except Exception as exc:  # the per-message guard: this request only
                    await failed(delivery, exc, self._on_dead)
                    continue
                kept.append(held)
        return await self._skip_done(kept)

    async def _kv_gone(self, delivery: Delivery, message: KvReady, outbox: Outbox) -> None:
        """A hand-off whose KV cache is gone (its encoder died, or its lease ran out unread): the
        request goes back to the encode queue from the tokens already delivered, once (a request
        encoded again hands off without ``resume``: a second loss fails it); acked after."""
        if message.resume is None:
            outbox.failure(
                message.reply_to,
                Failure(message.request_id, 500, "KV cache lost before decoding (encoder gone or lease ended)"),
            )
            await self._ack_after(delivery, outbox)
            return
        log.info("worker %s: hand-off %s: KV cache gone; encoding it again", self.worker_id, message.request_id)
        await self.bus.publish(
            self.names.encode_queue,
            codec.encode(message.resume),  # its deadline header kept
            headers={**{k: v for k, v in delivery.headers.items() if k not in DEAD_HEADERS}, REENCODED_HEADER: "1"},
        )
        if self.role == "decoder":  # the slot its encoder reserved: the new encode reserves its own
            await self.credits.grant(self.follower.version, 1)
        await delivery.ack()

    async def _skip_done(self, candidates: list[Held]) -> list[Held]:
        """Only a redelivered message can belong to a request that already finished: look those
        up, in one round trip, and ack them."""
        again = [h for h in candidates if h.delivery.redelivered]
        try:
            markers = await self.store.get_many(*(self.names.done(h.request_id) for h in again))
        except Exception as exc:  # the store is out: run them (a finished one's tokens are dropped as repeats)
            if not is_outage(exc):
                raise
            log.warning(
                "worker %s: done markers unreadable (%r); running %d redelivered requests",
                self.worker_id,
                exc,
                len(again),
            )
            return candidates
        finished = {h.request_id for h, m in zip(again, markers) if m is not None}
        for h in candidates:
            if h.request_id in finished:
                await h.delivery.ack()
        return [h for h in candidates if h.request_id not in finished]

    async def _ack_after(self, delivery: Delivery, outbox: Outbox) -> None:
        await self.send(outbox)
        await delivery.ack()

    # ==== schedule and roles =====================================================================
    async def drop_aborted(self) -> None:
        """Between steps: aborted requests, and those past their deadline (their client has
        stopped waiting), leave the engine and this worker at once; their messages are acked in
        the background, once the events sent for them are settled (those for a gateway that is
        gone take the grace for its queue: the next step does not wait for them)."""
        now = time.time()
        self._abort_pending.extend(
            rid for rid, held in self.held.items() if held.deadline is not None and held.deadline <= now
        )
        while self._abort_pending:
            rid = self._abort_pending.pop()
            held = self.held.pop(rid, None)
            if held is None:
                continue
            if rid in self.driver.running:
                await self.runner.call(self.runner.engine.abort, rid)
            self.driver.remove(rid)
            self._end_decode_span(held, "abort")
            self._keep(self._settle(held, "abort", []), held)

    async def wait_for_work(self) -> None:
        """Idle: until something arrives (an encoder waiting for credits also looks again soon)."""
        self._busy_since = None  # the next step's interval starts at its own start
        await self._return_credits(StepPlan())
        if self.stopping.is_set():
            return  # the loop decides whether anything is left to drain
        starved = self.role == "encoder" and bool(self.driver.queued)
        if starved:
            await self.inbox.wait(self._credit_wait)
            self._credit_wait = min(2 * self._credit_wait, CREDIT_POLL_S[1])
            return
        self._credit_wait = CREDIT_POLL_S[0]
        self._arrived: list[tuple[str, int]] = []  # queued since the last boundary (for the trace)
        await self.inbox.wait(None if not self._drain else max(self._drain.deadline - time.monotonic(), 0))
        if not self.driver.running and not self._drain:  # idle: start with the whole burst
            await self.inbox.settle(self.config.gather_s, GATHER_GAPS * self.config.gather_s)

    async def fit_intake(self) -> None:
        """A "worker" takes from the encode queue only what it could start at its next boundary:
        B_D, except while a static batch holds its slots (finished members' included), when it
        takes nothing more until the batch ends; the prefetch changes only then."""
        intake = self._intake.get(self.names.encode_queue)
        if self.role != "worker" or self._drain is not None or intake is None:
            return
        held = sum(h.ready is None for h in self.held.values())  # unacked on the encode queue
        want = intake_prefetch(self.driver.policy, len(self.driver.running), held, self.follower.schedule.decode_batch)
        if want != self._encode_prefetch:
            await intake.set_prefetch(want)
            self._encode_prefetch = want

    # ==== execute ================================================================================


def _imported(ref: str, payload: KvPayload | BaseException | None) -> KVHandoff | BaseException | None:
    """A fetched payload as the engine's hand-off; a header the engine cannot read is as corrupt
    as bytes that do not unpack (the same everywhere: no retry)."""
    if not isinstance(payload, KvPayload):
        return payload
    try:
        return engine_handoff(payload)
    except ValueError as exc:
        return CorruptPayload(f"{ref}: {exc}")
