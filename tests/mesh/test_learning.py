"""The scheduler learns the machine and plans for the traffic (memory; RabbitMQ + Redis).

- step costs in heartbeats fit the calibrated model, which a new leader finds in the store;
- arrivals counted by the gateway make the next plan one for that rate, under the SLO, with the
  candidates it weighed in the state record;
- SetSlo reaches the planner.

The planner plans OPT-13B on the reference H200 profile (as in test_brain); the workers run the
fake engine, whose own steps are not what is calibrated here: the step costs are made up with a
known slowdown of the profile's own prediction."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from common.messages import codec
from common.messages.control import SetSlo
from common.messages.status import SchedulerState, StepCost, WorkerStatus
from common.names import Names
from services.scheduler.calibrate import StepCalibrator, predicted_s
from services.schedules import wire_schedule
from tests.brokers import need
from tests.mesh.conftest import running_mesh, until
from tests.mesh.fake_engine import load

pytestmark = pytest.mark.usefixtures("cleanup")
PROFILE = Path(__file__).resolve().parents[2].parent / "shared" / "profiles" / "h200-reference-split.jsonl"
SLOWDOWN = 1.3


@pytest.fixture
def config(mesh_config):
    need(PROFILE.exists(), f"no reference profile at {PROFILE}")
    return mesh_config.model_copy(
        update={
            "model": "opt-13b",
            "profile": str(PROFILE),
            "cluster": "h200-nvlink-ib",
            "prior": "S",
            "prior_scale": 0.1,
            "latency_bound_s": 0.5,
            "replan_interval_s": 1.0,
        }
    )


def slowed_costs(calibrator: StepCalibrator, at: float) -> tuple[StepCost, ...]:
    """Steps of each kind that took SLOWDOWN x what the raw profile predicts for them."""
    timer = calibrator.raw_timer()
    shapes = [("decode", 0, 0, 1.0, rows, 40.0) for rows in (1, 4, 16)]
    shapes += [("prefill", n, n * 30, 30.0, 0, 1.0) for n in (1, 4)]
    costs = []
    for kind, pre, tokens, seq, rows, ctx in shapes:
        probe = StepCost(kind, False, pre, tokens, seq, rows, ctx, 1.0, at)
        costs.append(StepCost(kind, False, pre, tokens, seq, rows, ctx, SLOWDOWN * predicted_s(timer, probe), at))
    return tuple(costs)


async def test_step_costs_in_heartbeats_calibrate_the_model_and_are_kept_in_the_store(config, hub):
    async with running_mesh(config, hub, load, workers=1) as m:
        scheduler = m.mesh.scheduler
        calibrator = scheduler.brain.calibrator
        for _ in range(12):  # twelve heartbeats of a worker whose steps take 1.3x the profile's
            costs = slowed_costs(calibrator, time.time())
            scheduler.record(WorkerStatus("w-slow", "worker", 0, 0, 0, "alive", time.time(), step_costs=costs))
        table = calibrator.table(time.time())
        for kind, tokens in (("decode", 4), ("decode", 16), ("prefill", 120)):
            assert table.scalar(kind, tokens) == pytest.approx(SLOWDOWN, rel=0.02), (kind, tokens)
        names = Names(config.namespace)
        looks = scheduler.looks
        await until(lambda: scheduler.looks > looks + 10, [scheduler.learned])  # a save every 10 looks
        state = codec.decode(await scheduler.store.get(names.scheduler_state), SchedulerState)
        assert state.calibration_samples >= 12 and {p.kind for p in state.calibration} == {"decode", "prefill"}
        assert all(p.factor == pytest.approx(SLOWDOWN, rel=0.02) for p in state.calibration)
        stored = await scheduler.store.get(names.calibration)
    fresh = StepCalibrator(calibrator.planner, 60.0)
    fresh.loads(stored)  # what a new leader does when it takes office
    assert fresh.table(time.time()).scalar("decode", 4) == pytest.approx(SLOWDOWN, rel=0.02)


async def test_counted_arrivals_make_the_plan_one_for_that_rate_with_its_candidates(config, hub):
    async with running_mesh(config, hub, load, workers=2) as m:
        scheduler = m.mesh.scheduler
        await until(lambda: scheduler.brain.plan is not None and scheduler.brain.plan.workers == 2, [scheduler.decided])
        assert scheduler.brain.plan.rate_per_s == 0  # nothing counted yet: planned saturated
        names = Names(config.namespace)
        now = int(time.time())
        for second in range(now - 30, now + 30):  # the gateways counted 40 requests a second, then and on
            await scheduler.store.add(names.arrivals(second), 40, ttl_s=60)
        await until(lambda: scheduler.brain.plan.rate_per_s > 0, [scheduler.decided])
        decision = scheduler.last_decision
        assert decision.reason.startswith("rate 0 -> 40")
        plan = scheduler.brain.plan
        assert plan.rate_per_s == pytest.approx(40.0) and plan.attainment >= 0.99
        state = codec.decode(await scheduler.store.get(names.scheduler_state), SchedulerState)
        assert state.forecast_rate_s == pytest.approx(40.0)
        assert len(state.planned_input_quantiles) == len(state.planned_output_quantiles) == 3
        assert state.candidates and state.candidates[0].chosen
        assert state.candidates[0].schedule == wire_schedule(plan.schedule)
        assert all(
            c.capacity_seq_s >= 40.0 for c in state.candidates if not c.chosen or math.isfinite(c.capacity_seq_s)
        )

        # an SLO set through the scheduler's queue is what the next search plans for
        replans = scheduler.brain.replans
        await scheduler.bus.publish(
            names.scheduler_queue, codec.encode(SetSlo(0.05, 0.99, math.inf, 0.99, time.time()))
        )
        await until(lambda: scheduler.brain.replans > replans, [scheduler.decided])
        assert scheduler.last_decision.reason.startswith("slo TTFT p99 <= 0.05 s")
        state = codec.decode(await scheduler.store.get(names.scheduler_state), SchedulerState)
        assert state.ttft_bound_s == 0.05 and math.isinf(state.tpot_bound_s)
        assert state.predicted_ttft_s <= 0.05


async def test_steps_measured_during_a_search_are_not_calibrated_on(config, hub):
    """Where the scheduler shares the workers' cores its search slows their steps; fitted, that
    slowdown would be a reason to search again. Steps that overlap a search are left out."""
    async with running_mesh(config, hub, load, workers=1) as m:
        scheduler = m.mesh.scheduler
        await until(lambda: scheduler.brain.plan is not None and scheduler.planning is None, [scheduler.decided])
        calibrator = scheduler.brain.calibrator
        taken = calibrator.model.observed
        start = time.time()
        scheduler.searches.append([start, start + 5.0])  # a search that ran then
        during = slowed_costs(calibrator, start + 2.0)
        scheduler.record(WorkerStatus("w-slow", "worker", 0, 0, 0, "alive", time.time(), step_costs=during))
        assert calibrator.model.observed == taken
        after = slowed_costs(calibrator, start + 6.0)
        scheduler.record(WorkerStatus("w-slow", "worker", 0, 0, 0, "alive", time.time(), step_costs=after))
        assert calibrator.model.observed == taken + len(after)
        assert scheduler.during_search(start + 4.9, start + 5.1) and not scheduler.during_search(start + 5.5, start + 6)
