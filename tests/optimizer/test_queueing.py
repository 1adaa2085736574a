import math

import numpy as np
import pytest

from optimizer.analytic import Scenario
from optimizer.cluster import H200_CLUSTER
from optimizer.lengths import TASKS, TraceRequest
from optimizer.model import MODELS
from optimizer.queueing import (
    arrival_times,
    candidates,
    offered_rate,
    queueing_search,
    requests_at,
    requests_from_trace,
    sustained_rate,
)
from optimizer.search import PRODUCT_POLICIES, SearchSpace, branch_and_bound
from optimizer.simulator import simulate, within_bound

SPACE = SearchSpace(
    max_encode_batch=32,
    waa_max_encode_batch=16,
    static_max_batch=64,
    continuous_max_batch=128,
    iters_per_encode=(1, 2, 4, 8, 16),
    decode_caps=(4, 16, 64, 256),
    microbatches=(1, 2),
    encode_microbatches=(1, 2),
)


@pytest.fixture(scope="module")
def sc(profile):
    return Scenario(MODELS["opt-13b"], profile, H200_CLUSTER, TASKS["S"], 4)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_arrivals_have_the_rate_and_burstiness_asked_for(cv):
    t = arrival_times(np.random.default_rng(3), 20000, 50.0, cv)
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert np.mean(gaps) == pytest.approx(1 / 50.0, rel=0.05)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(cv, rel=0.08)


def test_a_trace_replays_its_arrivals_and_clips_its_lengths():
    rows = [TraceRequest(0.0, 10, 5), TraceRequest(0.5, 3000, 700), TraceRequest(2.0, 7, 1)]
    reqs = requests_from_trace(rows, max_input=2048, max_output=512)
    assert [(r.arrival_s, r.input_len, r.output_len) for r in reqs] == [(0.0, 10, 5), (0.5, 2048, 512), (2.0, 7, 1)]
    assert offered_rate(reqs) == pytest.approx(1.0)
    assert len(requests_from_trace(rows, limit=2)) == 2


def test_candidates_have_the_capacity_and_come_best_first(sc):
    ranked, searches, _ = candidates(sc, 0.6, 50.0, space=SPACE, fractions=(1.0, 0.7))
    thr = [c.figures.throughput_seq_s for c in ranked]
    assert ranked and all(t > 50.0 for t in thr) and thr == sorted(thr, reverse=True)
    assert searches == 2 * (1 + len(PRODUCT_POLICIES))  # the product's set and each policy alone, at each bound
    assert len({c.schedule for c in ranked}) == len(ranked)


def test_the_plan_keeps_99_percent_within_the_bound_at_its_rate(sc):
    bound = 0.6
    reqs = requests_at(sc.workload, arrival_times(np.random.default_rng(0), 300, 40.0, 1.5))
    plan = queueing_search(sc, bound, reqs, space=SPACE)
    assert plan.best is not None and plan.share_within >= 0.99
    again = simulate(sc, plan.best.schedule, reqs)
    assert within_bound(again, bound) == plan.share_within  # deterministic: the share reported is the simulated one
    assert plan.best.figures.throughput_seq_s > plan.rate_per_s


def test_no_plan_when_the_rate_exceeds_every_capacity(sc):
    reqs = requests_at(sc.workload, arrival_times(np.random.default_rng(0), 100, 1e6, 1.0))
    plan = queueing_search(sc, 0.6, reqs, space=SPACE)
    assert plan.best is None and plan.candidates == 0 and plan.checked == 0 and math.isnan(plan.share_within)


def _share(sc, schedule, bound, rate, seed, n):
    reqs = requests_at(sc.workload, arrival_times(np.random.default_rng(seed), n, rate), seed)
    return within_bound(simulate(sc, schedule, reqs), bound)


@pytest.mark.parametrize("policy", ["rra", "continuous"])
def test_the_sustained_rate_is_the_edge_between_a_rate_that_holds_and_one_that_does_not(sc, policy):
    bound, n, steps, seeds = 0.6, 200, 5, (0, 1)
    pick = branch_and_bound(sc, bound, (policy,), SPACE).best
    upper = 1.5 * pick.figures.throughput_seq_s
    rate = sustained_rate(sc, pick.schedule, bound, upper, requests=n, span_bounds=0, seeds=seeds, steps=steps)
    step = upper / 2**steps
    assert 0 < rate < upper - step  # the pick sustains something, and not its predicted saturation
    assert all(_share(sc, pick.schedule, bound, rate, s, n) >= 0.99 for s in seeds)
    assert min(_share(sc, pick.schedule, bound, rate + step, s, n) for s in seeds) < 0.99
    looser = sustained_rate(sc, pick.schedule, 2 * bound, upper, requests=n, span_bounds=0, seeds=seeds, steps=steps)
    assert looser >= rate


def test_a_sustained_rate_needs_a_positive_upper_rate(sc):
    pick = branch_and_bound(sc, 0.6, ("continuous",), SPACE).best
    with pytest.raises(ValueError, match="positive"):
        sustained_rate(sc, pick.schedule, 0.6, 0.0)


def test_each_rate_runs_enough_requests_to_span_the_bounds_asked_for(sc, monkeypatch):
    """Above capacity a short burst can be absorbed; so each rate tried runs its requests over at
    least ``span_bounds`` bounds."""
    import optimizer.queueing as queueing

    tried, real = [], queueing.arrival_times
    monkeypatch.setattr(queueing, "arrival_times", lambda rng, n, rate: tried.append((n, rate)) or real(rng, n, rate))
    pick = branch_and_bound(sc, 0.6, ("continuous",), SPACE).best
    sustained_rate(sc, pick.schedule, 0.6, 400.0, requests=50, span_bounds=20, seeds=(0,), steps=3)
    assert len(tried) == 3 and tried[0][1] == 200.0
    assert all(n == max(50, math.ceil(20 * 0.6 * rate)) for n, rate in tried)
    assert any(n > 50 for n, _ in tried)
