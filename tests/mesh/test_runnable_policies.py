"""The planner offers only policies the workers can run (``optimizer.policies.RUNNABLE_POLICIES``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from common.config import MeshConfig
from optimizer.lengths import TASKS
from optimizer.policies import RUNNABLE_POLICIES, make_policy
from optimizer.schedule import POLICIES, Schedule
from services.scheduler import planning
from services.scheduler.planning import POLICY_SETS, Planner, PlanningError, policy_set
from tests.brokers import need

PROFILE = Path(__file__).resolve().parents[2] / "../shared/profiles/h200-reference-split.jsonl"


def test_every_policy_set_is_runnable_and_every_runnable_policy_has_a_worker_policy():
    assert all(set(policies) <= RUNNABLE_POLICIES for policies in POLICY_SETS.values())
    assert RUNNABLE_POLICIES <= set(POLICIES)
    for policy in RUNNABLE_POLICIES:
        schedule = Schedule(policy, num_devices=2, encoder_devices=1, decoder_devices=1, chunk_tokens=64)
        roles = ("encoder", "decoder") if schedule.split else ("worker",)
        assert all(make_policy(schedule, role).schedule is schedule for role in roles)


def test_the_planner_drops_what_workers_cannot_run(monkeypatch):
    monkeypatch.setattr(planning, "RUNNABLE_POLICIES", RUNNABLE_POLICIES - {"mixed"})
    assert "mixed" not in policy_set("any") and "continuous" in policy_set("any")
    with pytest.raises(PlanningError, match="cannot run"):
        policy_set("mixed")


@pytest.mark.parametrize("runnable", [RUNNABLE_POLICIES, RUNNABLE_POLICIES - {"mixed", "continuous"}])
def test_a_plan_never_holds_a_policy_workers_cannot_run(monkeypatch, runnable):
    need(PROFILE.exists(), f"{PROFILE} not present (the shared folder beside the repository)")
    monkeypatch.setattr(planning, "RUNNABLE_POLICIES", runnable)
    planner = Planner(MeshConfig(profile=str(PROFILE), model="opt-13b", policies="any"))
    assert set(planner.policies) <= runnable
    plan = planner.plan(TASKS["S"], 4, math.inf)
    assert plan.schedule.policy in runnable
