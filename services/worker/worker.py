"""The worker: one kind of process whose role the schedule gives it.

Main loop, one iteration per step (the same ``Driver`` and policy objects the simulator runs)::

    receive (work or hand-offs → the driver) → schedule (a new version or role, at the boundary)
      → aborts → credits (WAA encoders) → plan = driver.plan() → execute (engine.step)
      → driver.complete → emit (tokens; hand-offs; finished requests settle)

Roles (``ScheduleUpdate.role_of``): under RRA, static and continuous a worker takes requests from
the encode queue and decodes them itself (the KV cache never leaves it); under WAA it is an
encoder (prefill, export, hand off) or a decoder (import, decode). A worker whose new role stops
it decoding keeps decoding for ``switch_drain_s``, then hands what still runs to decoders (WAA)
or re-queues it with the tokens already sent, so the text continues where it stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import assert_never

from common.config import MeshConfig
from common.lifecycle import Stage
from common.messages import codec
from common.messages.control import Abort, ControlMessage, ScheduleUpdate
from common.messages.events import Failure
from common.messages.handoff import HandoffMessage, KvReady
from common.messages.status import LengthSample, WorkerStatus
from common.messages.work import WorkMessage
from common.names import Names, new_worker_id
from common.tracing import tracing_for
from common.transport.connect import Transports
from common.transport.errors import Backoff, is_outage, what_failed
from common.transport.kv import CorruptPayload
from common.transport.port import (
    DEAD_HEADERS,
    REENCODED_HEADER,
    Delivery,
    NameTooLong,
    Subscription,
    Unroutable,
    check_name,
    failed,
    tell,
)
from engine.api import EngineBroken, KVHandoff
from optimizer.driver import Driver, StepOutcome
from optimizer.policies import (
    DrainPolicy,
    IdlePolicy,
    QueuedRequest,
    Role,
    RunningRequest,
    StepPlan,
    fused_steps,
    intake_prefetch,
    make_policy,
)
from optimizer.schedule import Schedule
from services.hosting.engines import EngineRunner, group_shape
from services.hosting.threads import step_key
from services.worker.costs import StepSampler, step_cost
from services.worker.credits import Credits
from services.worker.executor import StepResult, run_step
from services.worker.follower import ScheduleFollower
from services.worker.mailbox import Inbox, Outbox
from services.worker.metrics import WorkerMetrics, WorkerState
from services.worker.records import UnwrittenRecords
from services.worker.requests import Held
from services.worker.trace import StepTrace

ABORTED_REMEMBERED = 10_000
CREDIT_POLL_S = (0.002, 0.05)  # an encoder without credits looks again after this, doubling
GATHER_GAPS = 5  # an idle worker gathers a burst for at most this many gaps (MeshConfig.gather_s)
EVENTS_GRACE_S = 2.0  # a missing events queue is tried this long (its gateway may be declaring it again)

log = logging.getLogger(__name__)


def failed_task(task: asyncio.Task) -> bool:
    return task.done() and not task.cancelled() and task.exception() is not None


def dead_letter_message(reason: str) -> str:
    """What the client of a dead-lettered request is told."""
    return f"the request could not be processed and was moved to the dead queue: {reason}"


def intake_for(role: Role, schedule: Schedule, names: Names) -> dict[str, int]:
    """The queues a worker of ``role`` consumes, each with the unacked messages it may hold. A
    "worker" holds at most B_D requests, running and waiting together, so it takes only what it
    can start at its next boundary (a busy worker holding requests another could start, a static
    batch mid-way above all, would idle that one); it also takes hand-offs left over from a WAA
    schedule (or from a decoder that died) into free slots, so none is stranded. An encoder holds
    two encode batches (the run-time adjustment picks from them)."""
    if role == "worker":  # no more than its batch holds: what waits here could start on a worker with room
        return {names.encode_queue: schedule.decode_batch, names.handoff_queue: schedule.encode_batch}
    if role == "encoder":
        return {names.encode_queue: 2 * schedule.encode_batch}
    if role == "decoder":
        return {names.handoff_queue: schedule.decode_batch}
    return {}


@dataclass
class Drain:
    """Leaving a decoding role: decode until ``deadline`` (time.monotonic), then give back."""

    role: Role
    deadline: float


class Worker:
    def __init__(
        self, config: MeshConfig, transports: Transports, runner: EngineRunner, *, trace: bool = False
    ) -> None:
        self.config = config
        self.names = Names(config.namespace)
        self.transports = transports
        self.bus, self.store, self.kv = transports.bus, transports.store, transports.kv
        self.worker_id = new_worker_id(config, "worker")
        self.group = group_shape(config).tp  # announced in heartbeats
        self.runner = runner
        self.follower = ScheduleFollower(self.worker_id, config.max_encode_batch, config.max_decode_batch)
        self.role: Role = "idle"
        self.driver = Driver(
            IdlePolicy(self.follower.schedule), kv_tokens=getattr(runner.engine, "kv_budget_tokens", None)
        )
        self.held: dict[str, Held] = {}
        self.inbox = Inbox()
        self.credits = Credits(self.store, self.names)
        self.records = UnwrittenRecords(self.store, self.names)
        self.trace = StepTrace() if trace else None
        self.tracing = tracing_for(config)  # spans across services (not the step record above)
        self.aborted: dict[str, None] = {}
        self.gone: dict[str, None] = {}  # events queues found missing past the grace: their gateways are gone
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.changed = asyncio.Event()  # set whenever a schedule version or a role takes effect
        self.steps = 0
        self.engine_s = 0.0
        self.max_batch_seen = 0
        self.moved = {"handed_off": 0, "requeued": 0}  # running requests given back on a role change
        self._abort_pending: list[str] = []
        self._next_stamps = Outbox()  # stamps that go out with the next step's tokens
        self._intake: dict[str, Subscription] = {}  # queue -> subscription
        self._encode_prefetch = 0  # what the encode queue's consumer was last set to
        self._drain: Drain | None = None
        self._stop_deadline: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._credit_wait = CREDIT_POLL_S[0]
        self._arrived: list[tuple[str, int]] = []  # queued since the last boundary (for the trace)
        self.metrics = WorkerMetrics(self.metrics_state)
        self.step_costs = StepSampler(self.worker_id)  # for the scheduler's calibration, with each heartbeat
        self._busy_since: float | None = None  # the last step's end, while the loop went straight on to the next

    # ==== the loop ==============================================================================
    async def run(self) -> None:
        await self.start()
        backoff = Backoff()
        while self.should_continue():
            try:
                await self.iteration()
            except Exception as exc:  # an outage of the broker or the store: wait, then go on
                if not is_outage(exc):
                    raise
                delay = backoff.next_s()
                log.warning(
                    "worker %s: %s did not answer (%r); going on in %.1f s",
                    self.worker_id,
                    what_failed(exc),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)  # a retry's backoff, not a synchronisation
            else:
                backoff.reset()
        await self.close()

    async def iteration(self) -> None:
        """One batch boundary and (unless idle) one step."""
        await self.receive()
        await self.apply_schedule()
        await self.drop_aborted()
        await self.reserve_credits()
        plan = self.plan()
        if plan.idle:
            await self.wait_for_work()
            return
        result = await self.execute(plan)
        self.driver.complete(plan, self.outcome(result))
        await self.emit(plan, result)
        await self.fit_intake()

    def plan(self) -> StepPlan:
        plan = self.driver.plan()
        if self.trace is not None:  # requests received since the last boundary arrive at this one
            now = time.monotonic()
            for rid, input_len in self._arrived:
                self.trace.arrived(rid, input_len, now)
            self.trace.planned(plan, now)
        self._arrived.clear()
        return plan

    def should_continue(self) -> bool:
        """Run until stopped; then until the running batch is done or the drain time is up
        (what still runs then is redelivered to another worker when the connection closes)."""
        if not self.stopping.is_set():
            return True
        if self._stop_deadline is None:
            return True  # the next receive() begins the drain
        return bool(self.driver.running or self.driver.prefilling) and time.monotonic() < self._stop_deadline

    # ==== start and stop =========================================================================
    async def start(self) -> None:
        await self.bus.declare_fanout(self.names.control_exchange)
        await self.bus.declare_fanout(self.names.status_exchange)
        for queue in (self.names.encode_queue, self.names.handoff_queue):
            await self.bus.declare_queue(queue)
        control = await self.bus.subscribe(self.names.control_exchange, self.names.control_queue(self.worker_id))
        self._tasks.append(asyncio.create_task(self._pump_control(control)))
        await self.bus.declare_fanout(self.names.abort_exchange)
        aborts = await self.bus.subscribe(self.names.abort_exchange, self.names.abort_queue(self.worker_id))
        self._tasks.append(asyncio.create_task(self._pump_control(aborts, only=Abort)))
        stored = await self.store.get(self.names.schedule)
        if stored is not None:
            self.follower.offer(codec.decode(stored, ScheduleUpdate), stored=True)  # written under the lease
        self.follower.take()
        await self._enter(self.follower.role)
        self._tasks.append(asyncio.create_task(self._heartbeat()))
        await self.report("ready")
        self.ready.set()

    def stop(self) -> None:
        """Ask the loop to stop taking work and drain (safe from a signal handler)."""
        self.stopping.set()
        self.inbox.wake()

    async def _begin_stop(self) -> None:
        self._stop_deadline = time.monotonic() + self.config.drain_timeout_s
        await self._set_intake({})
        self.driver.switch(DrainPolicy(self.follower.schedule))
        await self.report("draining")

    async def close(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)
        for held in self.held.values():  # still running at the drain's end: redelivered elsewhere
            self._end_decode_span(held, "abandoned")
        await self.report("stopping")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.transports.close()

    # ==== receive ================================================================================
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
            if held.handoff is None:
                self.driver.enqueue(request)
                self._arrived.append((held.request_id, held.input_len))
            else:
                self.driver.offer(request)
        await self.send(outbox)
        for held in too_large:  # work is acked; a hand-off goes to the dead queue and frees its credit
            await self._refuse(held, [], None if held.handoff is None else "too large for this worker's KV cache")

    def _too_large(self, positions: int) -> str:
        return (
            f"prompt + max_tokens need {positions} tokens of KV cache; a worker's cache holds "
            f"{self.driver.kv_tokens} (lower max_tokens, or give workers more memory: kv_cache_gb)"
        )

    async def _decoded(self, deliveries: list[Delivery], kind) -> list[tuple[Delivery, object]]:
        """Each delivery with its message. To the dead queue, with the reason: bytes that do not
        decode (a requester that can still be named is told: a 400), and a message whose
        ``reply_to`` no broker can route (over 255 bytes: nobody could ever be answered)."""
        decoded = []
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
        """Work that can run here; bad bytes are dead-lettered, other models' work fails (400),
        aborted or already finished work is acked."""
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
                    held = Held.from_work(delivery, work)
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
        for (delivery, message), handoff in zip(ready, payloads):
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
    async def _pump_control(self, subscription: Subscription, only: type | object = ControlMessage) -> None:
        """Control messages as they come (``only``: the kinds this exchange may carry; the abort
        exchange, which gateways publish to, carries no schedules)."""
        async for delivery in subscription:
            try:
                self.on_control(codec.decode(delivery.body, only))
            except (codec.DecodeError, ValueError):
                pass  # unreadable, invalid or out of place: ignored, nothing to redeliver
            except Exception:  # one bad message never stops the worker's control
                log.exception("worker %s: control message ignored", self.worker_id)
            await delivery.ack()

    def on_control(self, message: ControlMessage) -> None:
        match message:
            case ScheduleUpdate():
                if self.follower.offer(message):
                    self.inbox.wake()
            case Abort(request_id=request_id):
                self.aborted[request_id] = None
                while len(self.aborted) > ABORTED_REMEMBERED:
                    self.aborted.pop(next(iter(self.aborted)))
                if request_id in self.held:
                    self._abort_pending.append(request_id)
                    self.inbox.wake()
            case _:
                assert_never(message)

    async def apply_schedule(self) -> None:
        """At the boundary: a newer version takes effect; a drain in progress may end."""
        if not self.stopping.is_set() and self.follower.take() is not None:
            cut = self.follower.capped()
            if cut:  # said once per version: the recorded schedule is not quite the one that runs
                log.warning(
                    "worker %s: schedule v%d runs with %s (max_encode_batch / max_decode_batch)",
                    self.worker_id,
                    self.follower.version,
                    cut,
                )
            await self._enter(self.follower.role)
            await self.report("applied")
            self.changed.set()
        busy = self.driver.running or self.driver.prefilling
        if self._drain is not None and (not busy or time.monotonic() >= self._drain.deadline):
            role, self._drain = self._drain.role, None
            await self._give_back_running()
            await self._become(role)

    async def _enter(self, role: Role) -> None:
        """Take ``role`` under the schedule in force; drain first if it stops us decoding what runs."""
        self._drain = None
        if (self.driver.running or self.driver.prefilling) and role not in ("worker", "decoder"):
            self._drain = Drain(role, time.monotonic() + self.config.switch_drain_s)
            await self._set_intake({})
            self.driver.switch(DrainPolicy(self.follower.schedule))
            return
        await self._become(role)

    async def _become(self, role: Role) -> None:
        schedule = self.follower.schedule
        await self._set_intake(intake_for(role, schedule, self.names))
        unchanged = (
            role == self.role
            and schedule == self.driver.policy.schedule
            and not isinstance(self.driver.policy, (DrainPolicy, IdlePolicy))
        )
        self.role = role
        if not unchanged:  # a version that only moved other workers keeps this policy's counters
            self.driver.switch(make_policy(schedule, role))
        self.changed.set()
        if role == "decoder":  # this version's count starts from what it can take now
            free = schedule.decode_batch - len(self.driver.running) - len(self.driver.incoming)
            await self.credits.grant(self.follower.version, max(free, 0))

    async def _set_intake(self, queues: dict[str, int]) -> None:
        """Consume ``queues`` (queue -> prefetch); work taken from a queue no longer consumed and
        not started goes back."""
        dropped = [q for q in self._intake if q not in queues]
        for queue in dropped:
            await self._intake.pop(queue).cancel()
        if dropped:
            await self._give_back_waiting(set(dropped))
        self._encode_prefetch = queues.get(self.names.encode_queue, 0)
        for queue, prefetch in queues.items():
            if queue in self._intake:
                await self._intake[queue].set_prefetch(prefetch)
            else:
                self._intake[queue] = await self.bus.consume(queue, prefetch=prefetch, on_dead=self._on_dead)
                self._tasks.append(asyncio.create_task(self._pump(queue, self._intake[queue])))

    async def _give_back_waiting(self, queues: set[str]) -> None:
        """Requeue what came from ``queues`` and has not started: received deliveries, queued
        work, unmerged hand-offs."""
        for queue, delivery in self.inbox.take():
            if queue in queues:
                await delivery.release()
            else:
                self.inbox.put((queue, delivery))
        waiting = []
        if self.names.encode_queue in queues:
            waiting += list(self.driver.queued)
        if self.names.handoff_queue in queues:
            waiting += list(self.driver.incoming)
        for rid in waiting:
            self.driver.remove(rid)
            await self.held.pop(rid).delivery.release()  # not started: no attempt used

    async def _give_back_running(self) -> None:
        """Requests still running when a drain ends: to the decoders if the schedule has them and
        they have room (the KV cache moves), else back to the encode queue with the tokens sent
        (as is a prompt still being prefilled in chunks)."""
        running = list(self.driver.running)
        if not (running or self.driver.prefilling):
            return
        room = 0
        if self.follower.schedule.split and running:
            room = await self.credits.take(self.follower.version, len(running))
        running += list(self.driver.prefilling)
        outbox = Outbox()
        for rid in running:
            for token in self.held[rid].flush():
                outbox.token(self.held[rid].reply_to, token)
        published = self.send_soon(outbox)
        moves = []
        for i, rid in enumerate(running):
            held = self.held.pop(rid)
            self.driver.remove(rid)
            if i < room:
                handoff = await self.runner.call(self.runner.engine.export_request, rid, self.kv.export_buffer)
                moves.append(self._hand_off(held, handoff, published))
                self.moved["handed_off"] += 1
            else:
                await self.runner.call(self.runner.engine.abort, rid)
                moves.append(self._requeue(held, published))
                self.moved["requeued"] += 1
        await asyncio.gather(*moves)

    async def _requeue(self, held: Held, published: list[asyncio.Task[None]]) -> None:
        """Back to the encode queue with the tokens already delivered; a KV cache it came with
        is dropped (the next worker prefills prompt + tokens)."""
        self._end_decode_span(held, "requeued")
        await asyncio.gather(*held.sent, *published)
        await self.bus.publish(
            self.names.encode_queue,
            codec.encode(held.continuation(self.config.model)),
            headers=self.tracing.inject(held.trace),
            deadline=held.deadline,
        )
        if held.ready is not None:
            await self.kv.drop(held.ready.kv_ref)
        await held.delivery.ack()

    # ==== aborts and credits =====================================================================
    async def drop_aborted(self) -> None:
        """Between steps: aborted requests, and those past their deadline (their client has
        stopped waiting), leave the engine and this worker; their messages are acked."""
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
            await self._settle(held, "abort", [])

    async def reserve_credits(self) -> None:
        """An encoder holds, for this step, the decode slots its encode batch may fill."""
        if self.role != "encoder":
            self.driver.downstream_free = None
            return
        want = 2 * self.follower.schedule.encode_batch if self.driver.queued else 0
        self.driver.downstream_free = await self.credits.take(self.follower.version, want)

    async def _return_credits(self, plan: StepPlan) -> None:
        unused = (self.driver.downstream_free or 0) - len(plan.encode)
        if self.role == "encoder" and unused > 0:
            await self.credits.grant(self.follower.version, unused)
        self.driver.downstream_free = None

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
    async def execute(self, plan: StepPlan) -> StepResult:
        await self._return_credits(plan)
        self._credit_wait = CREDIT_POLL_S[0]
        self._arrived: list[tuple[str, int]] = []  # queued since the last boundary (for the trace)
        chunked = tuple(c.request_id for c in plan.chunks)
        prompts = {rid: self.held[rid].generation_request() for rid in (*plan.encode, *chunked)}
        handoffs = {rid: self.held[rid].handoff for rid in plan.admit}
        started = time.time()
        for rid in (*plan.encode, *(c.request_id for c in plan.chunks if c.start == 0)):
            self.held[rid].encode_start_at = started
        if self.role == "encoder":  # each request it encodes used one of the credits it took
            for rid in plan.encode:
                self.held[rid].credit = True
        try:
            prompt_tokens = sum(len(prompts[rid].prompt_ids) for rid in plan.encode) + sum(
                c.length for c in plan.chunks
            )
            result = await self.runner.step(
                step_key(prompt_tokens, len(plan.decode) + len(plan.admit)),
                run_step,
                self.runner.engine,
                plan,
                prompts,
                handoffs,
                self.kv.export_buffer if self.role == "encoder" else None,
            )
        except EngineBroken:
            raise  # nothing more can run here: exit, and the broker redelivers what this worker held
        except Exception as exc:  # an engine fault: these requests run elsewhere once, then fail
            result = await self._step_failed(plan, exc)
        for rid in plan.admit:  # imported into the cache (or gone): its received KV bytes are not read again
            if (held := self.held.get(rid)) is not None and held.handoff is not None:
                held.handoff = replace(held.handoff, kv=b"")
        for rid, why in result.faulted.items():  # the step went on without them
            self._fault(result, rid, f"engine fault: {why}")
        result.started_at, result.ended_at = started, time.time()
        self.steps += 1
        self.engine_s += result.ended_at - started
        self.max_batch_seen = max(self.max_batch_seen, len(plan.decode))
        self._count(plan, result)
        self._note_cost(plan, result)
        return result

    def _note_cost(self, plan: StepPlan, result: StepResult) -> None:
        """The step's shape and seconds, for the scheduler's calibration (steps that failed say
        nothing about the engine's speed). A worker of role "worker" reports the interval the step
        took in the loop: from the previous step's end when the loop went straight on from it
        (what the boundary in between cost, tokens sent and work taken, is part of running
        back-to-back steps, as the simulator runs them), else from its own start. An encoder or a
        decoder reports its engine step alone: the work around its steps is mostly the hand-off,
        which the simulator costs on the hand-off link, and it would otherwise enter the factors
        every policy's steps share."""
        since, self._busy_since = self._busy_since, result.ended_at
        if result.failed or result.given_back or result.refused:
            return
        d = self.driver
        decoded = (d.running.get(rid) or d.incoming.get(rid) for rid in plan.decode)
        contexts = [r.input_len + r.generated for r in decoded if r is not None]
        prompts = {rid: self.held[rid].input_len for rid in plan.encode if rid in self.held}
        start = result.started_at if since is None or self.role != "worker" else min(since, result.started_at)
        self.step_costs.note(
            step_cost(plan, prompts, contexts, fused_steps(d.policy.schedule), result.ended_at - start, result.ended_at)
        )

    def _count(self, plan: StepPlan, result: StepResult) -> None:
        outcomes = {
            "finished": sum(e.finished for e in result.events),
            "handed_off": len(result.exported),
            "given_back": len(result.given_back),
            "refused": len(result.refused),
            "failed": len(result.failed),
        }
        prompt_tokens = sum(self.held[rid].input_len for rid in plan.encode if rid in self.held) + sum(
            c.length for c in plan.chunks
        )
        self.metrics.step(plan, result.ended_at - result.started_at, prompt_tokens, len(result.events), outcomes)

    def metrics_state(self) -> WorkerState:
        """The worker as a scrape sees it now."""
        engine = self.runner.engine
        decodes = self.role in ("worker", "decoder")
        return WorkerState(
            worker_id=self.worker_id,
            role=self.role,
            version=self.follower.version,
            running=len(self.driver.running),
            held=len(self.held),
            decode_slots=self.follower.schedule.decode_batch if decodes else 0,
            kv_tokens=sum(r.input_len + r.generated for r in self.driver.running.values()),
            kv_bytes_per_token=getattr(engine, "kv_bytes_per_token", None),
            kv_allocated_bytes=getattr(engine, "kv_allocated_bytes", None),
            ready=self.ready.is_set() and not self.stopping.is_set(),
        )

    async def _step_failed(self, plan: StepPlan, exc: Exception) -> StepResult:
        """The engine failed a step: its requests leave the engine; each message goes back to the
        queue (another worker may run it), a counted attempt; at its last attempt it fails (500)."""
        result = StepResult()
        for rid in dict.fromkeys((*plan.encode, *(c.request_id for c in plan.chunks), *plan.admit, *plan.decode)):
            await self.runner.call(self.runner.engine.abort, rid)
            self._fault(result, rid, f"engine fault: {exc}")
        return result

    def _fault(self, result: StepResult, rid: str, why: str) -> None:
        """An engine fault on ``rid``: back to the queue (another worker may run it), a counted
        attempt; at its last attempt it fails (500)."""
        held = self.held[rid]
        if held.delivery.attempts >= held.delivery.limit:
            result.failed[rid] = why
        else:
            result.given_back.append(rid)

    @staticmethod
    def outcome(result: StepResult) -> StepOutcome:
        gone = set(result.refused) | set(result.failed) | set(result.given_back)
        finished = {e.request_id for e in result.events if e.finished} | gone
        return StepOutcome(tuple(finished), tuple(result.exported))

    # ==== emit ===================================================================================
    async def emit(self, plan: StepPlan, result: StepResult) -> None:
        """Tokens and stamps to the submitters; finished requests settle and hand-offs go out once
        their events are confirmed (in the background: the next step does not wait for them)."""
        outbox, self._next_stamps = self._next_stamps, Outbox()
        for rid in plan.first_tokens:  # prefilled: whole, or its last chunk
            held = self.held.get(rid)
            if held is None:  # a chunk the engine refused: settled below
                continue
            outbox.stamp(held.reply_to, rid, Stage.ENCODE_START, held.encode_start_at)
            outbox.stamp(held.reply_to, rid, Stage.ENCODE_END, result.ended_at)
        starts = plan.admit if self.role == "decoder" else plan.first_tokens  # a worker decodes what it encodes
        for rid in starts:
            if rid in self.held and rid not in result.refused and rid not in result.exported:
                outbox.stamp(self.held[rid].reply_to, rid, Stage.DECODE_START, result.ended_at)
        finished = self._record_events(result, outbox)
        if self.tracing.enabled:
            self._trace_step(plan, result)
        for rid in result.exported:
            held = self.held[rid]
            for token in held.flush():
                outbox.token(held.reply_to, token)
            outbox.stamp(held.reply_to, rid, Stage.HANDED_OFF, result.ended_at)
        for rid, why in result.refused.items():
            held = self.held[rid]
            outbox.failure(held.reply_to, Failure(rid, 400 if held.handoff is None else 500, why))
        for rid, why in result.failed.items():
            outbox.failure(self.held[rid].reply_to, Failure(rid, 500, why))
        published = self.send_soon(outbox)
        for rid in {e.request_id for e in result.events}:
            held = self.held[rid]
            held.sent = [t for t in held.sent if not t.done() or failed_task(t)] + published  # a failure stays seen
        for rid, reason in finished:
            held = self.held.pop(rid)
            self._keep(self._settle(held, reason, published), held)
        for rid, why in result.refused.items():  # work: bad input, acked; a hand-off: to the dead queue
            held = self.held.pop(rid)
            self._keep(self._refuse(held, published, None if held.handoff is None else f"refused: {why}"), held)
        for rid, why in result.failed.items():
            held = self.held.pop(rid)
            self._keep(self._refuse(held, published, f"failed: {why}"), held)
        for rid in result.given_back:
            held = self.held.pop(rid)
            self._keep(self._give_back(held), held)
        for rid, handoff in result.exported.items():
            held = self.held.pop(rid)
            self._keep(self._hand_off(held, handoff, published), held)

    def _record_events(self, result: StepResult, outbox: Outbox) -> list[tuple[str, str]]:
        finished = []
        now = time.time()
        for event in result.events:
            held = self.held[event.request_id]
            if not held.first_token_at:
                held.first_token_at = now
            for token in held.record(event):
                outbox.token(held.reply_to, token)
            if event.finished:
                finished.append((event.request_id, event.finish_reason or "stop"))
        return finished

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
            ref = await self.kv.put(handoff, producer=self.worker_id, ttl_s=self.config.kv_ttl_s)
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
    def _trace_step(self, plan: StepPlan, result: StepResult) -> None:
        """The step's spans, once per request (never per token): an encode span for each request it
        prefilled; a decode span opens for each request that starts decoding, and closes for each
        that finished or failed in it."""
        gone = {**result.refused, **result.failed, **{rid: "engine fault: given back" for rid in result.given_back}}
        for rid in plan.first_tokens:
            held = self.held[rid]
            held.trace = self.tracing.record(
                "encode",
                parent=held.trace,
                start_s=held.encode_start_at,
                end_s=result.ended_at,
                kind="consumer",
                attributes={
                    **self._span_attributes(held),
                    "exegpt.batch_size": len(plan.first_tokens),
                    "exegpt.prompt_tokens": held.input_len,
                },
                error=gone.get(rid),
            )
        decoding = (*plan.admit, *(plan.first_tokens if self.role != "encoder" else ()))
        for rid in decoding:
            held = self.held.get(rid)
            if held is not None and rid not in gone and rid not in result.exported:
                held.decode_span = self.tracing.start(
                    "decode", parent=held.trace, start_s=result.ended_at, attributes=self._span_attributes(held)
                )
                held.trace = self.tracing.context_of(held.decode_span)
        for event in result.events:
            if event.finished:
                self._end_decode_span(self.held[event.request_id], event.finish_reason or "stop", result.ended_at)
        for rid, why in gone.items():
            self._end_decode_span(self.held[rid], "failed", result.ended_at, error=why)

    def _span_attributes(self, held: Held) -> dict[str, str | int] | None:
        if not self.tracing.enabled:
            return None
        return {
            "exegpt.request_id": held.request_id,
            "exegpt.worker_id": self.worker_id,
            "exegpt.role": self.role,
            "exegpt.schedule_version": self.follower.version,
        }

    def _end_decode_span(self, held: Held, outcome: str, at: float | None = None, *, error: str | None = None) -> None:
        if held.decode_span is not None:
            self.tracing.end(
                held.decode_span,
                end_s=at,
                error=error,
                attributes={"exegpt.outcome": outcome, "exegpt.output_tokens": len(held.generated)},
            )
            held.decode_span = None

    def _keep(self, work, held: Held | None = None) -> None:
        """Run ``work`` (a request leaving this worker) in the background. If it fails (the broker
        or the store went away half-way), the request's message goes back to its queue where that
        is still possible (otherwise the broker returns it when the connection is gone) and its
        decode slot is freed: nothing stays held by a request that has left."""
        task = asyncio.create_task(work)
        self._background.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._background.discard(task)
            if task.cancelled() or task.exception() is None:
                return
            exc = task.exception()
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
            await asyncio.sleep(backoff.next_s())  # a retry's backoff while the gateway comes back

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

    async def report(self, state: str) -> bool:
        """Broadcast this worker's status; False when the broker could not take it (an outage:
        the next heartbeat tries again)."""
        running = len(self.driver.running)
        free = max(self.follower.schedule.decode_batch - running, 0) if self.role in ("worker", "decoder") else 0
        kv = self.metrics_state()
        status = WorkerStatus(
            self.worker_id,
            self.role,
            self.follower.version,
            running,
            free,
            state,
            time.time(),
            self.engine_s,
            self.steps,
            self.group,
            self.step_costs.drain(),
            kv.kv_tokens,
            float(kv.kv_tokens * (kv.kv_bytes_per_token or 0)),
            float(kv.kv_allocated_bytes or 0),
            (self.follower.schedule.encode_batch, self.follower.schedule.decode_batch),
        )
        try:
            await self.bus.broadcast(self.names.status_exchange, codec.encode(status))
        except Exception as exc:
            log.warning("worker %s: status report failed (%r); retrying at the next heartbeat", self.worker_id, exc)
            return False
        return True

    async def _heartbeat(self) -> None:
        """Report every heartbeat_s for as long as the worker runs, through broker outages: a
        worker whose reports stop is taken out of the schedule."""
        while True:
            await asyncio.sleep(self.config.heartbeat_s)  # a periodic report, not a synchronisation
            await self.report("alive")
            await self.records.flush()
