"""The decoder service: merge handed-off requests into the running batch (up to B_D) and decode.

Main loop, one iteration per decode step::

    receive (hand-offs, while the batch has room) → schedule (apply a new version)
      → admit (import KV caches) → execute (decode_step) → emit (tokens; finished: done, ack)

A hand-off stays unacked while its request runs, so a decoder that dies loses nothing: its
hand-offs go to another decoder, which imports the KV again and replays the same tokens (the
submitter drops indices it already has). Finished requests leave the batch at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from common.config import MeshConfig
from common.lifecycle import Stage
from common.messages import codec
from common.messages.events import Failure, Token
from common.messages.handoff import HandoffMessage, KvReady
from common.messages.status import LengthSample
from common.names import DONE_TTL_S, OUTPUT_LENGTHS_MAX
from common.transport.connect import Transports
from common.transport.port import Delivery
from engine.api import KVHandoff, TokenEvent
from services.encoder import token_of
from services.engines import EngineRunner
from services.worker import Outbox, WorkerBase


CHUNK_TOKENS = 64  # a non-streaming request's tokens go out at least this often
INLINE_IMPORT_BYTES = 1 << 20  # hand-offs up to this size are imported on the event loop
MAX_BURST_STEPS = CHUNK_TOKENS  # decode steps per engine call while nothing needs the loop in between


@dataclass
class Running:
    """A request in this decoder's batch, with the hand-off delivery that is acked when it ends."""

    delivery: Delivery
    ready: KvReady
    output_len: int
    unsent: list[Token] = field(default_factory=list)
    sent: list[asyncio.Task[None]] = field(default_factory=list)  # publishes the ack waits for
    stamp_unsent: bool = True  # its DECODE_START stamp waits for the next step's tokens
    claimed: asyncio.Task[None] | None = None  # the KV metadata's decoder field, written meanwhile

    def hold(self, token: Token) -> list[Token]:
        """Tokens due to go out now: all of them when streaming, else in chunks and at the end."""
        self.unsent.append(token)
        if self.ready.stream or token.finished or len(self.unsent) >= CHUNK_TOKENS:
            due, self.unsent = self.unsent, []
            return due
        return []


class DecoderService(WorkerBase):
    role = "decoder"

    def __init__(self, config: MeshConfig, transports: Transports, runner: EngineRunner) -> None:
        super().__init__(config, transports)
        self.runner = runner
        self.running: dict[str, Running] = {}
        self.steps = 0
        self.max_batch_seen = 0
        self._abort_pending: list[str] = []
        self._held = Outbox()  # stamps that go out with the next step's tokens
        self._settling: set[asyncio.Task[None]] = set()
        self._drain_deadline: float | None = None

    async def start(self) -> None:
        await self.start_common(self.names.handoff_queue, prefetch=self.config.max_decode_batch)

    @property
    def batch_limit(self) -> int:
        return min(self.follower.schedule.decode_batch, self.config.max_decode_batch)

    async def run(self) -> None:
        """Decode until stopped; then finish the running batch (bounded) and close."""
        await self.start()
        while self.should_continue():
            deliveries = await self.receive()
            await self.apply_schedule()
            await self.drop_aborted()
            await self.admit(deliveries)
            events = await self.execute()
            await self.emit(events)
        await asyncio.gather(*self._settling, return_exceptions=True)
        await self.report("stopping")
        await self.close()

    def should_continue(self) -> bool:
        """Run until stopped; then until the batch is empty or the drain time is up (whatever
        still runs then is redelivered to another decoder when the connection closes)."""
        if not self.stopping.is_set():
            return True
        if self._drain_deadline is None:
            return True
        return bool(self.running) and time.monotonic() < self._drain_deadline

    async def receive(self) -> list[Delivery]:
        """Wait for work when idle; otherwise take only what is ready, never beyond B_D."""
        if self.stopping.is_set():
            await self.begin_drain()
            return []
        room = self.batch_limit - len(self.running)
        if room <= 0:
            return []
        if not self.running:
            return await self.inbox.wait(room)
        return self.inbox.take(room)

    async def begin_drain(self) -> None:
        if self._drain_deadline is None:
            await self.stop_consuming()
            self._drain_deadline = time.monotonic() + self.config.drain_timeout_s

    async def admit(self, deliveries: list[Delivery]) -> None:
        """Import the hand-offs. Failures go out now; DECODE_START stamps wait in ``_held`` for
        the tokens of the next step (one message instead of two; the ack waits for it)."""
        if not deliveries:
            return
        outbox = Outbox()
        for delivery in deliveries:
            await self._admit_one(delivery, outbox)
        self._keep(self.send_soon(outbox, batch_size=len(self.running)))

    async def _admit_one(self, delivery: Delivery, outbox: Outbox) -> None:
        try:
            ready = codec.decode(delivery.body, HandoffMessage)
        except codec.DecodeError:
            await delivery.reject(requeue=False)
            return
        rid = ready.request_id
        done, handoff = await self._done_and_kv(delivery, ready)
        if rid in self.running or rid in self.aborted or done:
            await delivery.ack()  # a duplicate hand-off, or nothing left to do
            return
        if handoff is None:
            outbox.failure(ready.reply_to, Failure(rid, 500, "KV cache expired before decoding"))
            await delivery.ack()
            return
        try:
            await self._import(delivery, ready, handoff)
        except Exception as exc:  # a hand-off this engine cannot take (another model, bad bytes)
            outbox.failure(ready.reply_to, Failure(rid, 500, f"hand-off refused: {exc}"))
            await delivery.reject(requeue=False)
            return
        self._held.stamp(ready.reply_to, rid, Stage.DECODE_START)

    async def _done_and_kv(self, delivery: Delivery, ready: KvReady) -> tuple[bool, KVHandoff | None]:
        """Only a redelivered hand-off can belong to a request that already finished; a fresh one
        that repeats a running request (its encoder died before acking) is caught at settling,
        where the done marker is set once."""
        if not delivery.redelivered:
            return False, await self.kv.get(ready.kv_ref)
        done, handoff = await asyncio.gather(self.store.get(self.names.done(ready.request_id)),
                                             self.kv.get(ready.kv_ref))
        return done is not None, handoff

    async def _import(self, delivery: Delivery, ready: KvReady, handoff: KVHandoff) -> None:
        """Import (a small cache is copied right here: the engine is idle between steps, and a
        sub-millisecond copy costs less than a trip to its thread); recording the claim overlaps
        decoding (the ack waits for it)."""
        if len(handoff.kv) <= INLINE_IMPORT_BYTES:
            self.runner.engine.import_request(handoff)
        else:
            await self.runner.call(self.runner.engine.import_request, handoff)
        claimed = asyncio.create_task(self.kv.claim(ready.kv_ref, decoder=self.worker_id))
        self._keep([claimed])
        self.running[ready.request_id] = Running(delivery, ready, len(handoff.generated_ids),
                                                 claimed=claimed)

    async def execute(self) -> list[TokenEvent]:
        """One decode step; several in one engine call when no request streams (fewer hops)."""
        if not self.running:
            return []
        self.max_batch_seen = max(self.max_batch_seen, len(self.running))
        streaming = any(run.ready.stream for run in self.running.values())
        return await self.runner.call(self._steps, 1 if streaming else MAX_BURST_STEPS)

    def _steps(self, most: int) -> list[TokenEvent]:
        """On the engine thread: step until a request finishes, work or control waits, or ``most``."""
        events: list[TokenEvent] = []
        for _ in range(most):
            step = self.runner.engine.decode_step()
            self.steps += 1
            events += step
            if any(e.finished for e in step) or self._wanted_between_steps():
                break
        return events

    def _wanted_between_steps(self) -> bool:
        """Reads of plain attributes, safe from the engine thread: hand-offs, aborts, a schedule."""
        return self.inbox.waiting() or bool(self._abort_pending) or self.follower.has_pending()

    async def emit(self, events: list[TokenEvent]) -> None:
        """Tokens to their submitters; finished requests settle once their last tokens are out.

        Publishing overlaps the next decode step; only the settling (done marker, KV drop, ack)
        waits for the publisher confirms.
        """
        outbox, self._held = self._held, Outbox()
        batch_size = len(self.running)
        stamped = [run for run in self.running.values() if run.stamp_unsent]
        finished: list[tuple[Running, str]] = []
        for event in events:
            run = self.running.get(event.request_id)
            if run is None:
                continue  # aborted during the step
            run.output_len += 1
            for token in run.hold(token_of(event)):
                outbox.token(run.ready.reply_to, token)
            if event.finished:
                finished.append((self.running.pop(event.request_id), event.finish_reason or "stop"))
        published = self.send_soon(outbox, batch_size=batch_size)
        self._keep(published)
        for run in stamped:
            run.sent, run.stamp_unsent = published, False
        self._keep([asyncio.create_task(self._settle(run, reason, published)) for run, reason in finished])

    def _keep(self, tasks: list[asyncio.Task[None]]) -> None:
        """Hold background publishes and settlements until done (the loop awaits them at the end)."""
        for task in tasks:
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _settle(self, run: Running, reason: str, published: list[asyncio.Task[None]]) -> None:
        """After its events are confirmed: mark done once, record lengths, drop the KV, ack."""
        await asyncio.gather(*run.sent, *published, *filter(None, [run.claimed]))
        rid = run.ready.request_id
        sample = None  # aborted lengths would skew the scheduler's statistics
        if reason != "abort":
            sample = codec.encode(LengthSample(rid, run.ready.prompt_len, run.output_len, reason,
                                               time.time()))
        await asyncio.gather(
            self.store.set_once_and_record(self.names.done(rid), b"1", ttl_s=DONE_TTL_S,
                                           list_key=self.names.output_lengths, item=sample,
                                           max_len=OUTPUT_LENGTHS_MAX),
            self.kv.drop(run.ready.kv_ref))
        await run.delivery.ack()

    def on_abort(self, request_id: str) -> None:
        if request_id in self.running:
            self._abort_pending.append(request_id)

    async def drop_aborted(self) -> None:
        """Between steps: remove aborted requests from the engine and settle their hand-offs."""
        while self._abort_pending:
            run = self.running.pop(self._abort_pending.pop(), None)
            if run is not None:
                await self.runner.call(self.runner.engine.abort, run.ready.request_id)
                await self._settle(run, "abort", [])
