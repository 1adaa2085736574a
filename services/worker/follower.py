"""The schedule a worker follows: the version in force, its role in it, and the next one."""

from __future__ import annotations

from dataclasses import replace

from common.messages.control import ScheduleUpdate
from optimizer.policies import Role
from optimizer.schedule import Schedule

# Before any update arrives, a worker may serve alone: continuous batching needs no other role.
UNSCHEDULED = ScheduleUpdate(0, Schedule("continuous", encode_batch=8, decode_batch=32, worker_devices=1),
                             (), 0.0)


class ScheduleFollower:
    """Holds the update in force; a newer version waits until the worker's next boundary."""

    def __init__(self, worker_id: str, max_encode_batch: int, max_decode_batch: int) -> None:
        self.worker_id = worker_id
        self.caps = (max_encode_batch, max_decode_batch)
        self.update = UNSCHEDULED
        self._pending: ScheduleUpdate | None = None

    @property
    def version(self) -> int:
        return self.update.version

    @property
    def schedule(self) -> Schedule:
        """The schedule in force, its batch sizes within this worker's memory guard."""
        s = self.update.schedule
        return replace(s, encode_batch=min(s.encode_batch, self.caps[0]),
                       decode_batch=min(s.decode_batch, self.caps[1]))

    @property
    def role(self) -> Role:
        return self.update.role_of(self.worker_id)  # type: ignore[return-value]

    def offer(self, update: ScheduleUpdate) -> bool:
        """Remember ``update`` if it is newer than anything seen; True if so."""
        newest = self._pending.version if self._pending else self.version
        if update.version <= newest:
            return False
        self._pending = update
        return True

    def has_pending(self) -> bool:
        return self._pending is not None

    def take(self) -> ScheduleUpdate | None:
        """The pending update, now in force (call between iterations); None if there is none."""
        if self._pending is None:
            return None
        self.update, self._pending = self._pending, None
        return self.update
