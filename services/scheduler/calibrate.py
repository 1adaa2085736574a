"""The scheduler's side of calibration: workers' step costs against the raw profile.

Each ``StepCost`` a heartbeat carries is costed by the planner's *raw* timer (the profile as
measured, no correction) for the worker's own layout, the way the simulator costs that kind of
step (a decode iteration, a prefill pass, a prefill-then-decode step, or one fused mixed pass),
and the ratio goes to ``optimizer.calibration.Calibration``. The estimator's state is kept in the
store (``names.calibration``) so that a new leader starts calibrated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import msgpack

from common.messages.status import CalibrationPoint, StepCost
from optimizer.calibration import Calibration, CalibrationTable
from optimizer.lengths import scaled_task
from optimizer.profile import StepShape
from optimizer.timing import PipelineTimer
from services.scheduler.planning import Planner

log = logging.getLogger(__name__)


class StepCalibrator:
    def __init__(self, planner: Planner, half_life_s: float) -> None:
        self.planner = planner
        self.model = Calibration(half_life_s)
        self._timer: tuple[object, PipelineTimer] | None = None  # (the group it is for, the raw timer)

    def raw_timer(self) -> PipelineTimer:
        """One worker's pipeline on the raw profile (rebuilt when the workers' group shape changes)."""
        group = self.planner.group
        if self._timer is None or self._timer[0] != group:
            sc = self.planner.scenario(scaled_task("S", 1.0), 1)
            k, stages = sc.group_tp() or (1, 0)
            self._timer = (group, sc.timer(sc.layout(max(sc.worker_devices, 1), k, stages)))
        return self._timer[1]

    def observe(self, costs: Sequence[StepCost]) -> int:
        return observe(self.model, self.raw_timer(), costs)

    def table(self, now: float) -> CalibrationTable:
        return self.model.table(now)

    def dumps(self) -> bytes:
        return msgpack.packb(self.model.to_plain())

    def loads(self, data: bytes) -> None:
        """Carry on from a stored state (kept as is when it does not decode)."""
        try:
            self.model = Calibration.from_plain(msgpack.unpackb(data, raw=False))
        except Exception as exc:
            log.warning("scheduler: stored calibration not used (%r); starting afresh", exc)


def predicted_s(timer: PipelineTimer, cost: StepCost) -> float:
    """What ``timer`` (a raw one) predicts for the step ``cost`` measured, costed as the simulator
    costs that kind of step."""
    shape = StepShape(
        float(cost.prefill_seqs), float(cost.prefill_tokens), cost.prefill_seq, float(cost.decode_seqs), cost.decode_ctx
    )
    if cost.kind == "decode":
        return float(timer.iteration_s(shape, 1))
    if cost.kind == "prefill":
        return float(timer.encode_s(shape))
    return float(timer.iteration_s(shape, 1) if cost.fused else timer.mixed_s(shape, 1))


def observe(model: Calibration, timer: PipelineTimer, costs: Sequence[StepCost]) -> int:
    """Feed ``costs`` to ``model`` against ``timer``'s predictions; how many were taken."""
    taken = 0
    for cost in costs:
        try:
            taken += model.observe(
                cost.kind, cost.prefill_tokens + cost.decode_seqs, cost.seconds, predicted_s(timer, cost), cost.at
            )
        except ValueError as exc:  # a kind this scheduler does not know: a newer worker's record
            log.debug("step cost dropped: %s", exc)
    return taken


def points(table: CalibrationTable) -> tuple[CalibrationPoint, ...]:
    return tuple(CalibrationPoint(kind, tokens, factor) for kind, tokens, factor in table.summary())
