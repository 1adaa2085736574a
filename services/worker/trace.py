"""A worker's step record: when each request became visible to its driver and when each step
began, so that the simulator can replay the same time line through the same policy."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from optimizer.policies import StepPlan

TRACE_STEPS_MAX = 100_000


@dataclass(frozen=True)
class Arrival:
    request_id: str
    input_len: int
    at_s: float  # the boundary (time.monotonic of its plan) at which the driver first saw it


@dataclass(frozen=True)
class Boundary:
    at_s: float  # time.monotonic when the plan was made
    plan: StepPlan


class StepTrace:
    def __init__(self, limit: int = TRACE_STEPS_MAX) -> None:
        self.arrivals: deque[Arrival] = deque(maxlen=limit)
        self.boundaries: deque[Boundary] = deque(maxlen=limit)

    def arrived(self, request_id: str, input_len: int, at_s: float) -> None:
        self.arrivals.append(Arrival(request_id, input_len, at_s))

    def planned(self, plan: StepPlan, at_s: float) -> None:
        self.boundaries.append(Boundary(at_s, plan))

    def durations_s(self, since: float = float("-inf")) -> list[float]:
        """Each non-idle step's length (from ``since``): from its boundary to the next boundary
        of any kind (the loop's own work between steps included)."""
        out = []
        marks = [b for b in self.boundaries if b.at_s >= since]
        for here, nxt in zip(marks, marks[1:]):
            if not here.plan.idle:
                out.append(nxt.at_s - here.at_s)
        return out
