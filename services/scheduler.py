"""The scheduler service: owns the versioned schedule and tells every worker about new versions.

The current ScheduleUpdate lives in the store (``names.schedule``) for workers that join late and
goes out on the control fanout exchange. The scheduler also listens to workers' status reports.
Main loop: receive (a status report) → record it. Re-planning from the output-length statistics
(``names.output_lengths``) plugs in here later.
"""

from __future__ import annotations

import asyncio
import time

from common.config import MeshConfig
from common.messages import codec
from common.messages.control import ScheduleUpdate
from common.messages.status import LengthSample, StatusMessage, WorkerStatus
from common.names import Names
from common.transport.connect import Transports
from common.transport.port import Bus, Store, Subscription
from optimizer.schedule import Schedule
from services.worker import new_worker_id, plan_of


async def current_schedule(store: Store, names: Names) -> ScheduleUpdate | None:
    data = await store.get(names.schedule)
    return None if data is None else codec.decode(data, ScheduleUpdate)


async def publish_schedule(bus: Bus, store: Store, names: Names, schedule: Schedule) -> ScheduleUpdate:
    """Make ``schedule`` the next version: store it for late joiners, then tell every worker."""
    current = await current_schedule(store, names)
    update = ScheduleUpdate((current.version if current else 0) + 1, plan_of(schedule), time.time())
    body = codec.encode(update)
    await store.set(names.schedule, body)
    await bus.declare_fanout(names.control_exchange)
    await bus.broadcast(names.control_exchange, body)
    return update


async def recent_lengths(store: Store, names: Names, count: int) -> list[LengthSample]:
    """The newest finished requests' lengths, as workers recorded them."""
    return [codec.decode(item, LengthSample)
            for item in await store.list_range(names.output_lengths, count)]


def initial_schedule(config: MeshConfig) -> Schedule:
    return Schedule(policy="waa-c", encode_batch=config.max_encode_batch,
                    decode_batch=config.max_decode_batch, encoder_devices=1, decoder_devices=1,
                    num_devices=2)


class SchedulerService:
    def __init__(self, config: MeshConfig, transports: Transports) -> None:
        self.config = config
        self.names = Names(config.namespace)
        self.transports = transports
        self.bus, self.store = transports.bus, transports.store
        self.worker_id = new_worker_id(config, "scheduler")
        self.workers: dict[str, WorkerStatus] = {}
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self._status: Subscription | None = None

    async def start(self) -> None:
        await self.bus.declare_fanout(self.names.status_exchange)
        self._status = await self.bus.subscribe(self.names.status_exchange,
                                                self.names.status_queue(self.worker_id))
        if await current_schedule(self.store, self.names) is None:
            await self.publish(initial_schedule(self.config))
        self.ready.set()

    async def publish(self, schedule: Schedule) -> ScheduleUpdate:
        return await publish_schedule(self.bus, self.store, self.names, schedule)

    async def run(self) -> None:
        await self.start()
        stop = asyncio.create_task(self.stopping.wait())
        reports = asyncio.create_task(self._receive_reports())
        await asyncio.wait({stop, reports}, return_when=asyncio.FIRST_COMPLETED)
        for task in (stop, reports):
            task.cancel()
        await asyncio.gather(stop, reports, return_exceptions=True)
        await self.transports.close()

    def stop(self) -> None:
        self.stopping.set()

    async def _receive_reports(self) -> None:
        assert self._status is not None
        async for delivery in self._status:
            try:
                self.record(codec.decode(delivery.body, StatusMessage))
            except codec.DecodeError:
                pass
            await delivery.ack()

    def record(self, status: WorkerStatus) -> None:
        if status.state == "stopping":
            self.workers.pop(status.worker_id, None)
        else:
            self.workers[status.worker_id] = status
