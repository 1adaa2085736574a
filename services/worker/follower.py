"""The schedule a worker follows: the version in force, its role in it, and the next one.

Which updates it takes (the fencing rules of ``ScheduleUpdate``):
- updates are ordered by (epoch, version): one not after the newest seen is old news, dropped;
- one whose (epoch, token) is below the highest seen comes from a deposed leader: rejected;
- a broadcast that arrives after its ``lease_until`` (by this host's wall clock) was sent by a
  leader whose lease had passed: rejected. The update read from the store at start-up is exempt:
  it was written under the lease (a fenced write), so it was valid when written;
- one whose schedule the planner refuses (a scheduler of another version): rejected, the one in
  force stays.
A fresh store has a later epoch, so its version 1 follows version 57 of the store before it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from common.messages.control import ScheduleUpdate
from common.scheduling import DEFAULT_SCHEDULE
from optimizer.policies import Role
from optimizer.schedule import Schedule
from services.schedules import planned

log = logging.getLogger(__name__)

# Before any update arrives, a worker follows the default schedule alone (continuous batching needs
# no other role), as version 0
UNSCHEDULED = ScheduleUpdate(0, DEFAULT_SCHEDULE, (), 0.0)


class ScheduleFollower:
    """Holds the update in force; a newer version waits until the worker's next boundary."""

    def __init__(
        self, worker_id: str, max_encode_batch: int, max_decode_batch: int, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.worker_id = worker_id
        self.caps = (max_encode_batch, max_decode_batch)
        self.clock = clock  # wall clock, compared with the leader's lease_until
        self.update = UNSCHEDULED
        self.term = (0, 0)  # the highest (epoch, token) seen in an update that was not rejected
        self.rejected = {"fenced": 0, "late": 0, "invalid": 0}  # from a deposed leader; past their lease; unrunnable
        self._planned = planned(UNSCHEDULED.schedule)  # the update in force's schedule, as the planner's
        self._pending: tuple[ScheduleUpdate, Schedule] | None = None

    @property
    def version(self) -> int:
        return self.update.version

    @property
    def schedule(self) -> Schedule:
        """The schedule in force, its batch sizes within this worker's memory guard."""
        s = self._planned
        return replace(
            s, encode_batch=min(s.encode_batch, self.caps[0]), decode_batch=min(s.decode_batch, self.caps[1])
        )

    def capped(self) -> str | None:
        """What the memory guard cut from the schedule in force, in words (None: nothing)."""
        planned, runs = self.update.schedule, self.schedule
        cut = [
            f"{name} {want} -> {got}"
            for name, want, got in (
                ("B_E", planned.encode_batch, runs.encode_batch),
                ("B_D", planned.decode_batch, runs.decode_batch),
            )
            if got < want
        ]
        return ", ".join(cut) or None

    @property
    def role(self) -> Role:
        return self.update.role_of(self.worker_id)  # type: ignore[return-value]

    def offer(self, update: ScheduleUpdate, *, stored: bool = False) -> bool:
        """Remember ``update`` if it is valid and newer than anything seen; True if so.
        ``stored``: read from the store (written under the lease), not broadcast, so its lease
        is not checked."""
        if (update.epoch, update.token) < self.term:
            self.rejected["fenced"] += 1
            return False
        if not stored and self.clock() >= update.lease_until:
            self.rejected["late"] += 1
            return False
        self.term = (update.epoch, update.token)
        newest = self._pending[0] if self._pending else self.update
        if (update.epoch, update.version) <= (newest.epoch, newest.version):
            return False
        try:
            schedule = planned(update.schedule)
        except ValueError as exc:  # a schedule this version's planner refuses: the one in force stays
            log.warning("worker %s: schedule version %d not taken: %s", self.worker_id, update.version, exc)
            self.rejected["invalid"] += 1
            return False
        self._pending = (update, schedule)
        return True

    @property
    def rejections(self) -> int:
        return sum(self.rejected.values())

    def has_pending(self) -> bool:
        return self._pending is not None

    def take(self) -> ScheduleUpdate | None:
        """The pending update, now in force (call between iterations); None if there is none."""
        if self._pending is None:
            return None
        (self.update, self._planned), self._pending = self._pending, None
        return self.update
