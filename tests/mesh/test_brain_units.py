"""The scheduler's drift procedure as it runs (``services.brain.Brain``): a window that grows from
the last plan, a check every ``CHECK_EVERY`` finished requests, two significant checks in a row.
Pure: finish records are made up, time is an argument; no planner (no search runs)."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import MeshConfig
from common.messages.status import LengthSample
from optimizer.lengths import scaled_task
from services.brain import Brain
from services.planning import reference_sample

RATE = 5.0  # finished requests per second
S, T = scaled_task("S", 0.25), scaled_task("T", 0.25)


def brain_with_prior(now: float = 0.0) -> Brain:
    """A brain whose drift reference is the prior's sample, as after a cold-start plan on task S."""
    brain = Brain(MeshConfig(replan_interval_s=5.0), planner=None, now=now)
    brain.monitor.rebase(*reference_sample(S), now)
    return brain


def feed(brain: Brain, workload, n: int, rng, start: float, tag: str):
    """Finish ``n`` requests of ``workload`` one by one; yields (time, fired) after each."""
    ins, outs = workload.sample(rng, n)
    for i in range(n):
        now = start + i / RATE
        brain.ingest([LengthSample(f"{tag}{i}", int(ins[i]), int(outs[i]), "length", now, now - 1.0)])
        before = brain.drift
        brain.trigger(workers=2, pinned=False, now=now)
        yield now, brain.drift is not before and brain.drift.fired


def rebase_on_window(brain: Brain, now: float) -> None:
    """What ``adopt`` does after a search on the observed window."""
    brain.monitor.rebase(*brain.window(), now)
    brain.rebased_at, brain._checked_at, brain._drifted = now, 0, False


def test_same_distribution_rarely_fires():
    """Task S traffic against a task S plan at the default alpha (1e-4): 30 seeds x 1,000 requests
    (about 200 checks each, on overlapping windows of 50). Measured over 100 seeds: 3 fires in
    100,000 requests (at alpha 1e-3: 12)."""
    fires = 0
    for seed in range(30):
        brain = brain_with_prior()
        for now, fired in feed(brain, S, 1000, np.random.default_rng(seed), 1.0, f"s{seed}-"):
            if fired:
                fires += 1
                rebase_on_window(brain, now)
    assert fires <= 2


def test_a_shift_fires_within_a_few_dozen_requests():
    """500 task S requests, then task T: the test compares the newest 50 requests since the plan
    and needs two significant checks 5 requests apart. Measured over 100 seeds: median 25 task T
    requests, at most 30 (5-6 s at 5 finished requests per second)."""
    needed = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        brain = brain_with_prior()
        end = 0.0
        for end, fired in feed(brain, S, 500, rng, 1.0, f"s{seed}-"):
            if fired:  # a false alarm (test_same_distribution_rarely_fires): the search keeps the plan
                rebase_on_window(brain, end)
        for i, (_, fired) in enumerate(feed(brain, T, 200, rng, end + 1.0, f"t{seed}-"), start=1):
            if fired:
                needed.append(i)
                break
        else:
            pytest.fail(f"seed {seed}: no drift after 200 task T requests")
    assert max(needed) <= 40
