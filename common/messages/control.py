"""Scheduler and gateways -> every worker, on the control fanout exchange; and requests to the
scheduler, on its own queue."""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.messages.schedule import ScheduleSpec


@dataclass(frozen=True)
class RoleAssignment:
    """One live worker's role under a schedule: "worker" (RRA, static, continuous: it encodes
    and decodes its own requests), "encoder" or "decoder" (WAA)."""

    worker_id: str
    role: str


@dataclass(frozen=True)
class ScheduleUpdate:
    """Schedule ``version`` replaces every older one at the workers' next iteration boundary.

    ``allocation`` gives each live worker its role. A worker missing from it takes the role
    "worker" under RRA, static and continuous, and waits without a role under WAA.

    Fencing: ``epoch`` names the store's life (unix milliseconds when the store first held the
    mesh's keys; a fresh store after a restart has a later one), ``token`` the scheduler's term
    as leader (it grows with every lease taken). Updates are ordered by (epoch, version); a worker
    applies none whose (epoch, token) is below the highest it has seen, nor one that arrives after
    ``lease_until`` (unix seconds), when its leader's lease has passed."""

    version: int
    schedule: ScheduleSpec
    allocation: tuple[RoleAssignment, ...]
    published_at: float
    epoch: int = 0
    token: int = 0
    lease_until: float = math.inf

    def role_of(self, worker_id: str) -> str:
        for assignment in self.allocation:
            if assignment.worker_id == worker_id:
                return assignment.role
        return "idle" if self.schedule.split else "worker"


@dataclass(frozen=True)
class Abort:
    """The client went away: drop the request wherever it is."""

    request_id: str


ControlMessage = ScheduleUpdate | Abort


@dataclass(frozen=True)
class PinSchedule:
    """To the scheduler: run ``schedule`` from now on (its allocation still follows the live
    workers); None: unpin, let the scheduler choose again."""

    schedule: ScheduleSpec | None
    requested_at: float


@dataclass(frozen=True)
class SetBound:
    """To the scheduler: plan for this latency bound from now on (seconds to generate a
    99th-percentile-length output; math.inf: none)."""

    latency_bound_s: float
    requested_at: float


@dataclass(frozen=True)
class Replan:
    """To the scheduler: search again now, on the statistics it holds, whatever the drift test says."""

    reason: str
    requested_at: float


@dataclass(frozen=True)
class SetSlo:
    """To the scheduler: plan for these TTFT and TPOT bounds from now on, each at its percentile
    (math.inf: that bound not in force); the end-to-end bound stays as ``SetBound`` set it."""

    ttft_s: float
    ttft_percentile: float
    tpot_s: float
    tpot_percentile: float
    requested_at: float


SchedulerRequest = PinSchedule | SetBound | Replan | SetSlo
