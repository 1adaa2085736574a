"""What every worker shares: identity, transports, the schedule it follows, its inbox and outbox."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import assert_never

from common.config import MeshConfig
from common.lifecycle import Stage
from common.messages import codec
from common.messages.control import Abort, ControlMessage, SchedulePlan, ScheduleUpdate
from common.messages.events import EventBatch, Failure, Stamp, Token
from common.messages.status import WorkerStatus
from common.names import Names
from common.transport.connect import Transports
from common.transport.port import Delivery, Subscription, Unroutable
from optimizer.schedule import Schedule

ABORTED_REMEMBERED = 10_000


def new_worker_id(config: MeshConfig, role: str) -> str:
    if config.worker_id:
        return config.worker_id
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


def plan_of(schedule: Schedule) -> SchedulePlan:
    return SchedulePlan(schedule.policy, schedule.encode_batch, schedule.decode_batch,
                        schedule.decode_microbatches, schedule.decode_iters_per_encode,
                        schedule.tp_degree, schedule.tp_stages, schedule.num_devices,
                        schedule.encoder_devices, schedule.decoder_devices)


def schedule_of(plan: SchedulePlan) -> Schedule:
    return Schedule(plan.policy, plan.encode_batch, plan.decode_batch, plan.decode_microbatches,
                    plan.decode_iters_per_encode, plan.tp_degree, plan.tp_stages, plan.num_devices,
                    plan.encoder_devices, plan.decoder_devices)  # type: ignore[arg-type]


class ScheduleFollower:
    """Holds the schedule in force; a newer version waits until the worker's next boundary."""

    def __init__(self) -> None:
        self.version = 0
        self.schedule = Schedule()
        self._pending: tuple[int, Schedule] | None = None

    def offer(self, update: ScheduleUpdate) -> bool:
        """Remember ``update`` if it is newer than anything seen; True if so.

        Raises ValueError for a plan that is not a valid Schedule (it is then ignored).
        """
        newest = self._pending[0] if self._pending else self.version
        if update.version <= newest:
            return False
        self._pending = (update.version, schedule_of(update.plan))
        return True

    def apply(self) -> bool:
        """Switch to the pending version, if any (call between iterations); True if switched."""
        if self._pending is None:
            return False
        (self.version, self.schedule), self._pending = self._pending, None
        return True


class Inbox:
    """Deliveries waiting for a worker; ``wake`` ends a wait early (stop, new schedule)."""

    def __init__(self) -> None:
        self._items: asyncio.Queue[Delivery | None] = asyncio.Queue()

    def put(self, delivery: Delivery) -> None:
        self._items.put_nowait(delivery)

    def wake(self) -> None:
        self._items.put_nowait(None)

    async def wait(self, up_to: int) -> list[Delivery]:
        """Block for at least one delivery (or a wake), then take what else is ready."""
        first = await self._items.get()
        return self._take([] if first is None else [first], up_to)

    def take(self, up_to: int) -> list[Delivery]:
        return self._take([], up_to)

    def _take(self, got: list[Delivery], up_to: int) -> list[Delivery]:
        while len(got) < up_to and not self._items.empty():
            item = self._items.get_nowait()
            if item is not None:
                got.append(item)
        return got

    async def requeue_all(self) -> None:
        for delivery in self.take(1 << 30):
            await delivery.reject(requeue=True)


@dataclass
class Outbox:
    """Events of one iteration, grouped by the queue of the submitter that awaits them."""

    tokens: dict[str, list[Token]] = field(default_factory=lambda: defaultdict(list))
    stamps: dict[str, list[Stamp]] = field(default_factory=lambda: defaultdict(list))
    failures: dict[str, list[Failure]] = field(default_factory=lambda: defaultdict(list))

    def token(self, reply_to: str, token: Token) -> None:
        self.tokens[reply_to].append(token)

    def stamp(self, reply_to: str, request_id: str, stage: Stage, at: float | None = None) -> None:
        self.stamps[reply_to].append(Stamp(request_id, stage, time.time() if at is None else at))

    def failure(self, reply_to: str, failure: Failure) -> None:
        self.failures[reply_to].append(failure)

    def batches(self, producer: str, role: str, version: int, size: int) -> dict[str, EventBatch]:
        queues = set(self.tokens) | set(self.stamps) | set(self.failures)
        return {q: EventBatch(producer, role, version, size, tuple(self.tokens.get(q, ())),
                              tuple(self.stamps.get(q, ())), tuple(self.failures.get(q, ())))
                for q in queues}


class WorkerBase:
    """Identity, transports, schedule and control handling of one encoder or decoder."""

    role = "worker"

    def __init__(self, config: MeshConfig, transports: Transports) -> None:
        self.config = config
        self.names = Names(config.namespace)
        self.transports = transports
        self.bus, self.store, self.kv = transports.bus, transports.store, transports.kv
        self.worker_id = new_worker_id(config, self.role)
        self.follower = ScheduleFollower()
        self.inbox = Inbox()
        self.aborted: dict[str, None] = {}
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._work: Subscription | None = None

    # --- start and stop ---------------------------------------------------------------------
    async def start_common(self, queue: str, prefetch: int) -> None:
        await self.bus.declare_fanout(self.names.control_exchange)
        await self.bus.declare_fanout(self.names.status_exchange)
        control = await self.bus.subscribe(self.names.control_exchange,
                                           self.names.control_queue(self.worker_id))
        await self._load_current_schedule()
        self._tasks.append(asyncio.create_task(self._pump_control(control)))
        await self.bus.declare_queue(queue)
        self._work = await self.bus.consume(queue, prefetch=prefetch)
        self._tasks.append(asyncio.create_task(self._pump_work(self._work)))
        await self.report("ready")
        self.ready.set()

    async def _load_current_schedule(self) -> None:
        data = await self.store.get(self.names.schedule)
        if data is not None:
            self.follower.offer(codec.decode(data, ScheduleUpdate))
            self.follower.apply()

    def stop(self) -> None:
        """Ask the main loop to stop consuming and drain (safe from a signal handler)."""
        self.stopping.set()
        self.inbox.wake()

    async def stop_consuming(self) -> None:
        if self._work is not None:
            await self._work.cancel()
            self._work = None
        await self.inbox.requeue_all()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.transports.close()

    # --- inbound ----------------------------------------------------------------------------
    async def _pump_work(self, subscription: Subscription) -> None:
        async for delivery in subscription:
            self.inbox.put(delivery)

    async def _pump_control(self, subscription: Subscription) -> None:
        async for delivery in subscription:
            try:
                self.on_control(codec.decode(delivery.body, ControlMessage))
            except (codec.DecodeError, ValueError):
                pass  # unreadable or invalid control: ignored, nothing to redeliver
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
                self.on_abort(request_id)
            case _:
                assert_never(message)

    def on_abort(self, request_id: str) -> None:
        """Drop ``request_id`` wherever this worker holds it (roles override)."""

    async def apply_schedule(self) -> None:
        if self.follower.apply():
            await self.report("applied")

    # --- outbound ---------------------------------------------------------------------------
    async def send(self, outbox: Outbox, batch_size: int) -> None:
        """Publish one EventBatch per submitter, concurrently; a submitter that vanished is skipped."""
        await asyncio.gather(*self.send_soon(outbox, batch_size))

    def send_soon(self, outbox: Outbox, batch_size: int) -> list[asyncio.Task[None]]:
        """Start publishing; the caller awaits the tasks before acking anything that depends on them."""
        batches = outbox.batches(self.worker_id, self.role, self.follower.version, batch_size)
        return [asyncio.create_task(self._publish_event(q, codec.encode(b))) for q, b in batches.items()]

    async def _publish_event(self, queue: str, body: bytes) -> None:
        try:
            await self.bus.publish(queue, body)
        except Unroutable:
            pass  # its client is gone with it

    async def report(self, state: str, running: int = 0) -> None:
        status = WorkerStatus(self.worker_id, self.role, self.follower.version, running, state,
                              time.time())
        await self.bus.broadcast(self.names.status_exchange, codec.encode(status))
