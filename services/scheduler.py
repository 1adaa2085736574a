"""The scheduler service: owns the versioned schedule and gives every live worker its role.

Main loop: receive (heartbeats from the status exchange; pin requests from its queue) → note who
is alive (a worker silent for ``heartbeat_timeout_s`` is gone) → allocate roles
(``services.allocation``) → publish a new version when the schedule or the roles change.

The current ScheduleUpdate lives in the store (``names.schedule``) for workers that join late and
goes out on the control fanout exchange. Re-planning from the length statistics
(``names.output_lengths``) plugs in here.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from common.config import MeshConfig
from common.messages import codec
from common.messages.control import PinSchedule, ScheduleUpdate, SchedulerRequest
from common.messages.status import LengthSample, StatusMessage, WorkerStatus
from common.names import Names
from common.transport.connect import Transports
from common.transport.port import Bus, Store, Subscription
from optimizer.schedule import Schedule
from services.allocation import Allocation, allocate
from services.worker import new_worker_id

# A fresh machine has no profile: one worker can run this alone, and so can any number of them.
DEFAULT_SCHEDULE = Schedule("continuous", encode_batch=8, decode_batch=32, worker_devices=1)


def parse_schedule(text: str) -> Schedule:
    """A schedule from JSON (an object of ``Schedule`` fields, or ``exegpt plan --json``'s output,
    whose "schedule" it takes) or from a file holding it."""
    source = Path(text).read_text() if not text.lstrip().startswith("{") else text
    try:
        fields = json.loads(source)
        if isinstance(fields, dict) and isinstance(fields.get("schedule"), dict):
            fields = fields["schedule"]
        return Schedule(**fields)
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"not a schedule: {exc}") from None


async def current_schedule(store: Store, names: Names) -> ScheduleUpdate | None:
    data = await store.get(names.schedule)
    return None if data is None else codec.decode(data, ScheduleUpdate)


async def recent_lengths(store: Store, names: Names, count: int) -> list[LengthSample]:
    """The newest finished requests, as workers recorded them."""
    return [codec.decode(item, LengthSample) for item in await store.list_range(names.output_lengths, count)]


async def request_schedule(bus: Bus, names: Names, schedule: Schedule | None) -> None:
    """Ask the scheduler to pin ``schedule`` (None: unpin)."""
    await bus.declare_queue(names.scheduler_queue)
    await bus.publish(names.scheduler_queue, codec.encode(PinSchedule(schedule, time.time())))


class SchedulerService:
    def __init__(self, config: MeshConfig, transports: Transports) -> None:
        self.config = config
        self.names = Names(config.namespace)
        self.transports = transports
        self.bus, self.store = transports.bus, transports.store
        self.worker_id = new_worker_id(config, "scheduler")
        self.pinned = parse_schedule(config.schedule) if config.schedule else DEFAULT_SCHEDULE
        self.workers: dict[str, WorkerStatus] = {}
        self.heard: dict[str, float] = {}  # worker id -> time.monotonic of its last report
        self.current: ScheduleUpdate | None = None
        self.allocation: Allocation | None = None
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.published = asyncio.Event()  # set at each publish (tests wait on it)
        self._changed = asyncio.Event()

    async def start(self) -> tuple[Subscription, Subscription]:
        await self.bus.declare_fanout(self.names.control_exchange)
        await self.bus.declare_fanout(self.names.status_exchange)
        await self.bus.declare_queue(self.names.scheduler_queue)
        status = await self.bus.subscribe(self.names.status_exchange, self.names.status_queue(self.worker_id))
        requests = await self.bus.consume(self.names.scheduler_queue, prefetch=16)
        self.current = await current_schedule(self.store, self.names)
        stored = await self.store.get(self.names.pinned_schedule)
        if stored is not None and not self.config.schedule:  # a restarted scheduler keeps the pin
            self.pinned = codec.decode(stored, PinSchedule).schedule or DEFAULT_SCHEDULE
        await self.reconcile()
        self.ready.set()
        return status, requests

    async def run(self) -> None:
        status, requests = await self.start()
        tasks = [asyncio.create_task(self._receive_reports(status)),
                 asyncio.create_task(self._receive_requests(requests)),
                 asyncio.create_task(self._keep_allocated()),
                 asyncio.create_task(self.stopping.wait())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.transports.close()

    def stop(self) -> None:
        self.stopping.set()

    # --- receive ------------------------------------------------------------------------------
    async def _receive_reports(self, subscription: Subscription) -> None:
        async for delivery in subscription:
            try:
                self.record(codec.decode(delivery.body, StatusMessage))
            except codec.DecodeError:
                pass
            await delivery.ack()

    async def _receive_requests(self, subscription: Subscription) -> None:
        async for delivery in subscription:
            try:
                request = codec.decode(delivery.body, SchedulerRequest)
            except codec.DecodeError:
                await delivery.reject(requeue=False)
                continue
            await self.pin(request.schedule)
            await delivery.ack()

    def record(self, status: WorkerStatus) -> None:
        """A heartbeat: the worker is alive (or, ``stopping``, gone)."""
        known = status.worker_id in self.heard
        if status.state == "stopping":
            self.workers.pop(status.worker_id, None)
            self.heard.pop(status.worker_id, None)
            self._changed.set()
            return
        self.workers[status.worker_id] = status
        self.heard[status.worker_id] = time.monotonic()
        if not known:
            self._changed.set()

    # --- decide and publish -------------------------------------------------------------------
    async def pin(self, schedule: Schedule | None) -> ScheduleUpdate | None:
        """Run ``schedule`` from now on (None: back to the default); returns what was published."""
        self.pinned = schedule or DEFAULT_SCHEDULE
        await self.store.set(self.names.pinned_schedule, codec.encode(PinSchedule(schedule, time.time())))
        return await self.reconcile()

    def expire(self) -> None:
        """Forget workers silent for longer than the heartbeat timeout."""
        limit = time.monotonic() - self.config.heartbeat_timeout_s
        for worker_id in [w for w, at in self.heard.items() if at < limit]:
            self.heard.pop(worker_id)
            self.workers.pop(worker_id, None)
            self._changed.set()

    async def _keep_allocated(self) -> None:
        """Re-allocate when workers join or leave; look for silent ones every heartbeat."""
        while not self.stopping.is_set():
            try:
                async with asyncio.timeout(self.config.heartbeat_s):
                    await self._changed.wait()
            except TimeoutError:
                pass
            self._changed.clear()
            self.expire()
            await self.reconcile()

    async def reconcile(self) -> ScheduleUpdate | None:
        """Publish a new version if the schedule to run or the roles of the live workers changed."""
        previous = {a.worker_id: a.role for a in self.current.allocation} if self.current else {}
        allocation = allocate(self.pinned, list(self.heard), previous)
        if self.current is not None and (self.current.schedule, self.current.allocation) == (
                allocation.schedule, allocation.roles):
            return None
        self.allocation = allocation
        return await self._publish(allocation)

    async def _publish(self, allocation: Allocation) -> ScheduleUpdate | None:
        """Make ``allocation`` the next version: in the store, then to every worker."""
        version = (self.current.version if self.current else 0) + 1
        self.current = ScheduleUpdate(version, allocation.schedule, allocation.roles, time.time())
        body = codec.encode(self.current)
        await self.store.set(self.names.schedule, body)
        await self.bus.broadcast(self.names.control_exchange, body)
        self.published.set()
        return self.current
