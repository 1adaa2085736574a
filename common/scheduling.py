"""The scheduler's client side: reading the schedule in force and what the scheduler recorded, and
asking it to re-plan, pin or change its SLO. Any process may use it: the gateway's admin API, the
benchmarks, the tests. The scheduler itself is ``services.scheduler``.

``DEFAULT_SCHEDULE`` is the one schedule that runs before any other: what the scheduler publishes
when it has nothing planned or pinned, and what a worker follows before any update reaches it.
"""

from __future__ import annotations

import time
from typing import Any

from common.messages import codec
from common.messages.control import PinSchedule, Replan, ScheduleUpdate, SetBound, SetSlo
from common.messages.schedule import ScheduleSpec
from common.messages.status import LengthSample, SchedulerState
from common.names import Names
from common.transport.port import Bus, Store

# A fresh machine has no profile: one worker can run this alone, and so can any number of them.
DEFAULT_SCHEDULE = ScheduleSpec("continuous", encode_batch=8, decode_batch=32, worker_devices=1)


async def current_schedule(store: Store, names: Names) -> ScheduleUpdate | None:
    data = await store.get(names.schedule)
    return None if data is None else codec.decode(data, ScheduleUpdate)


async def recent_lengths(store: Store, names: Names, count: int) -> list[LengthSample]:
    """The newest finished requests, as workers recorded them."""
    return [codec.decode(item, LengthSample) for item in await store.list_range(names.output_lengths, count)]


async def request_schedule(bus: Bus, names: Names, schedule: ScheduleSpec | None) -> None:
    """Ask the scheduler to pin ``schedule`` (None: unpin)."""
    await ask_scheduler(bus, names, PinSchedule(schedule, time.time()))


async def schedule_records(store: Store, names: Names) -> tuple[ScheduleUpdate | None, SchedulerState | None]:
    """The current ScheduleUpdate and SchedulerState, in one round trip (None where absent or
    not of this schema)."""
    update, state = await store.get_many(names.schedule, names.scheduler_state)
    return _decoded(update, ScheduleUpdate), _decoded(state, SchedulerState)


def _decoded(data: bytes | None, kind: type) -> Any:
    if data is None:
        return None
    try:
        return codec.decode(data, kind)
    except codec.DecodeError:
        return None


async def ask_scheduler(bus: Bus, names: Names, message: SetBound | Replan | SetSlo | PinSchedule) -> None:
    """Send ``message`` to the leading scheduler (its queue is declared first: none may run yet)."""
    await bus.declare_queue(names.scheduler_queue)
    await bus.publish(names.scheduler_queue, codec.encode(message))
