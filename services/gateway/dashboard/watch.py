"""The workers as the dashboard shows them: every heartbeat on the status exchange, heard by the
gateway from the first time a dashboard asks (so a gateway nobody watches listens to nothing).

A worker is ``live`` while it reports, ``draining`` while it says so, and ``gone`` once it said it
stops or has been silent for ``heartbeat_timeout_s`` (the scheduler's own rule); a gone worker stays
listed for ``GONE_KEEP_S`` so the operator sees it leave. Its step rate and busy share come from the
difference between its last two heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from common.messages import codec
from common.messages.status import StatusMessage, WorkerStatus
from common.names import Names
from common.transport.port import Bus, Subscription

log = logging.getLogger(__name__)

GONE_KEEP_S = 600.0


@dataclass
class Heard:
    """A worker's last two heartbeats and when the gateway heard the last one (its own clock)."""

    last: WorkerStatus
    heard_at: float
    previous: WorkerStatus | None = None


def worker_row(heard: Heard, now: float, timeout_s: float) -> dict[str, Any]:
    """One worker's row: its heartbeat's fields, its rates, and whether it is live, draining or gone."""
    s, before = heard.last, heard.previous
    silent_s = max(now - heard.heard_at, 0.0)
    if s.state == "stopping" or silent_s > timeout_s:
        status = "gone"
    elif s.state == "draining":
        status = "draining"
    else:
        status = "live"
    step_rate = busy = None
    if before is not None and s.at > before.at:
        span = s.at - before.at
        step_rate = max(s.steps - before.steps, 0) / span
        busy = min(max(s.engine_s - before.engine_s, 0.0) / span, 1.0)
    return {
        "worker_id": s.worker_id,
        "role": s.role,
        "state": s.state,
        "status": status,
        "schedule_version": s.schedule_version,
        "running": s.running,
        "free_slots": s.free_slots,
        "step_rate_s": step_rate,
        "busy": busy,
        "steps": s.steps,
        "group": list(s.group),
        "heartbeat_age_s": silent_s,
        "kv_tokens": s.kv_tokens,
        "kv_used_bytes": s.kv_used_bytes or None,
        "kv_allocated_bytes": s.kv_allocated_bytes or None,
        "applied_batch": list(s.applied_batch) if any(s.applied_batch) else None,
    }


class WorkerWatch:
    def __init__(self, bus: Bus, names: Names, listener_id: str, timeout_s: float) -> None:
        self.bus, self.names, self.listener_id, self.timeout_s = bus, names, listener_id, timeout_s
        self.heard: dict[str, Heard] = {}
        self.noted = asyncio.Event()  # set at each heartbeat (tests wait on it)
        self._task: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None
        self._starting = asyncio.Lock()

    async def ensure_started(self) -> None:
        async with self._starting:
            if self._task is not None and not self._task.done():
                return  # listening (a subscription the broker ended is made again)
            await self.bus.declare_fanout(self.names.status_exchange)
            self._subscription = await self.bus.subscribe(
                self.names.status_exchange, self.names.status_queue(self.listener_id)
            )
            self._task = asyncio.create_task(self._receive(self._subscription))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._subscription is not None:
            try:
                await self._subscription.cancel()
            except Exception as exc:  # the broker went first: its queue is exclusive and goes with it
                log.debug("dashboard: status subscription not cancelled: %r", exc)

    async def _receive(self, subscription: Subscription) -> None:
        loop = asyncio.get_running_loop()
        async for delivery in subscription:
            try:
                self.note(codec.decode(delivery.body, StatusMessage), loop.time())
            except codec.DecodeError:
                pass  # a worker of another schema version: its next heartbeat says the same
            await delivery.ack()

    def note(self, status: WorkerStatus, now: float) -> None:
        known = self.heard.get(status.worker_id)
        previous = known.last if known is not None and known.last.at < status.at else None
        self.heard[status.worker_id] = Heard(status, now, previous)
        self.noted.set()

    def rows(self, now: float) -> list[dict[str, Any]]:
        """Every worker heard, gone ones kept ``GONE_KEEP_S``, in id order."""
        for worker_id in [w for w, h in self.heard.items() if now - h.heard_at > GONE_KEEP_S]:
            del self.heard[worker_id]
        return [worker_row(self.heard[w], now, self.timeout_s) for w in sorted(self.heard)]
