"""Planning for the traffic that arrives: the pick follows the forecast rate, its headroom and the SLO's kind.

OPT-13B on two H200s of the reference profile, task T with lengths x0.1 (what the mesh's brain
tests plan on), fixed seeds."""

import math
from dataclasses import replace

import pytest

from optimizer.analytic import Scenario
from optimizer.cluster import H200_CLUSTER
from optimizer.lengths import scaled_task
from optimizer.model import MODELS
from optimizer.schedule import Schedule
from optimizer.search import SearchSpace
from optimizer.slo import Slo, SloFigures
from optimizer.traffic import (
    COMFORT,
    KEEP_SHARE,
    SURGE,
    Forecast,
    Weighed,
    alike,
    capacity_of,
    choose,
    forecast,
    plan_for_traffic,
    seen,
    to_weigh,
)

SPACE = SearchSpace().capped(32)


@pytest.fixture(scope="module")
def task_t(profile):
    return Scenario(MODELS["opt-13b"], profile, H200_CLUSTER, scaled_task("T", 0.1), 2)


def pick(sc, slo, rate, **kw):
    plan = plan_for_traffic(sc, slo, Forecast(rate, 1.0), space=SPACE, **kw)
    assert plan is not None
    return plan


def test_traffic_served_comfortably_gets_the_candidate_with_the_most_capacity(task_t):
    slo = Slo(e2e_s=0.5)
    for rate in (2.0, 40.0):
        plan = pick(task_t, slo, rate)
        assert plan.reaches_target
        comfortable = [w for w in plan.weighed if w.attainment >= slo.target and w.slo.pressure <= COMFORT]
        assert plan.best in comfortable
        assert plan.best.capacity_seq_s == max(w.capacity_seq_s for w in comfortable)
        assert plan.best.capacity_seq_s >= SURGE * rate  # headroom for a rise the forecast has not seen


def weighed(capacity: float, pressure: float, attainment: float = 1.0) -> Weighed:
    return Weighed(
        Schedule("continuous", encode_batch=int(capacity), decode_batch=int(capacity)),
        capacity,
        SloFigures(attainment, 0.1, 0.01, 0.5, attainment >= 0.99, 500, pressure),
    )


def test_a_quicker_schedule_wins_only_where_the_larger_one_comes_close_to_a_bound():
    fc, slo = Forecast(10.0, 1.0), Slo(e2e_s=1.0)
    quick, large, strained = weighed(30.0, 0.40), weighed(90.0, 0.70), weighed(90.0, 0.95)
    assert choose([quick, large], fc, slo) == (large, True)  # both well inside the bound: capacity
    assert choose([quick, strained], fc, slo) == (quick, True)  # the large one near its bound: slack
    # attainment first: the one that meets the target, however much slack the other has
    assert choose([weighed(90.0, 0.3, attainment=0.95), strained], fc, slo) == (strained, True)


def test_a_ttft_slo_picks_a_quicker_first_token_and_a_tpot_slo_a_quicker_next_one(task_t):
    free = pick(task_t, Slo(), 60.0).best
    ttft_s, tpot_s = 0.8 * free.slo.ttft_s, 0.8 * free.slo.tpot_s  # tighter than the free pick's own
    ttft = pick(task_t, Slo(ttft_s=ttft_s), 60.0).best
    tpot = pick(task_t, Slo(tpot_s=tpot_s), 60.0).best
    assert ttft.slo.ttft_s <= ttft_s and ttft.attainment >= 0.99
    assert tpot.slo.tpot_s <= tpot_s and tpot.attainment >= 0.99
    assert ttft.slo.ttft_s < free.slo.ttft_s
    assert tpot.slo.tpot_s < free.slo.tpot_s
    assert ttft.schedule != tpot.schedule


def test_the_schedule_in_force_is_weighed_on_the_same_arrivals(task_t):
    small = Schedule("continuous", encode_batch=2, decode_batch=2, num_devices=2, decoder_devices=2, worker_devices=1)
    plan = pick(task_t, Slo(e2e_s=0.5), 40.0, current=small)
    assert small in [w.schedule for w in plan.weighed]
    assert plan.best.schedule != small


def test_when_nothing_reaches_the_target_the_highest_sustained_rate_wins(task_t):
    plan = pick(task_t, Slo(e2e_s=0.5), 2000.0)  # far beyond any schedule's capacity
    assert not plan.reaches_target
    rated = [w for w in plan.weighed if math.isfinite(w.sustained_rate_s)]
    assert rated and plan.best.sustained_rate_s == max(w.sustained_rate_s for w in rated)


def bisected(sc, schedule, slo, fc, steps=5) -> float:
    """The plain bisection on [0, forecast rate] that ``sustained`` must agree with."""
    from optimizer.traffic import sustains

    lo, hi = 0.0, fc.rate_per_s
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sustains(sc, schedule, slo, fc, mid) else (lo, mid)
    return lo


@pytest.mark.parametrize("rate", [10.0, 60.0, 2000.0])  # sustained above half the forecast, below it, far below
def test_the_sustained_rate_is_the_plain_bisections_in_fewer_simulations(task_t, monkeypatch, rate):
    import optimizer.traffic as traffic

    slo, fc = Slo(e2e_s=0.5), Forecast(rate, 1.0)
    schedule = pick(task_t, slo, 40.0).best.schedule
    expected = bisected(task_t, schedule, slo, fc)
    calls = []
    real = traffic.simulate
    monkeypatch.setattr(traffic, "simulate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert traffic.sustained(task_t, schedule, slo, fc) == expected
    if expected > rate / 2:
        assert len(calls) == 4  # half the forecast is never simulated
    # a candidate that cannot beat a rate another sustains is told in one simulation
    calls.clear()
    if expected + rate / 32 < rate:  # the bisection's upper end was simulated, and failed
        assert math.isnan(traffic.sustained(task_t, schedule, slo, fc, beat=expected + rate / 32)) and len(calls) == 1
    if expected > 0:
        assert traffic.sustained(task_t, schedule, slo, fc, beat=expected) == expected


def test_a_candidate_that_cannot_carry_the_rate_is_not_chosen_over_one_that_can(task_t):
    plan = pick(task_t, Slo(e2e_s=0.5), 40.0)
    small = [w for w in plan.weighed if w.capacity_seq_s < 40.0]
    best, _ = choose([*small, plan.best], Forecast(40.0, 1.0), Slo(e2e_s=0.5))
    assert best == plan.best


def test_when_nothing_reaches_the_target_a_candidate_that_cannot_carry_the_rate_is_not_chosen():
    fc, slo = Forecast(10.0, 1.0), Slo(e2e_s=1.0)
    small = replace(weighed(5.0, 2.0, attainment=0.7), sustained_rate_s=9.0)  # its bisection's noise
    large = replace(weighed(30.0, 2.5, attainment=0.6), sustained_rate_s=8.0)
    larger = replace(weighed(40.0, 2.5, attainment=0.6), sustained_rate_s=8.0)
    assert choose([small, large], fc, slo) == (large, False)
    assert choose([small, large, larger], fc, slo) == (larger, False)  # a tie: the one with more capacity


def test_while_the_rate_has_not_fallen_no_smaller_schedule_than_the_one_in_force_is_weighed(task_t):
    slo = Slo(e2e_s=0.5)
    free = pick(task_t, slo, 20.0)
    capacity = {w.schedule: w.capacity_seq_s for w in free.weighed}
    middle = sorted(capacity, key=capacity.get)[len(capacity) // 2]  # a schedule with smaller and larger ones
    kept = pick(task_t, slo, 20.0, current=middle, keep_capacity=True)
    others = [w for w in kept.weighed if w.schedule != middle]
    assert all(w.capacity_seq_s >= KEEP_SHARE * capacity[middle] for w in others)
    assert kept.best.schedule == middle or kept.best.capacity_seq_s >= KEEP_SHARE * capacity[middle]
    # without it (the rate fell), smaller ones are weighed as well
    assert any(w.capacity_seq_s < capacity[middle] for w in pick(task_t, slo, 20.0, current=middle).weighed)


def test_a_schedule_in_force_that_no_search_picks_now_still_sets_the_floor(task_t):
    """The schedule in force differs from every candidate (planned on other lengths, say): its
    capacity is simulated and put on the search's scale by its nearest peer (here, the candidate
    it differs from in its expected prompt length alone), it bounds the candidates from below
    and it is weighed with it."""
    slo = Slo(e2e_s=0.5)
    free = pick(task_t, slo, 20.0)
    capacity = {w.schedule: w.capacity_seq_s for w in free.weighed}
    middle = sorted(capacity, key=capacity.get)[len(capacity) // 2]
    running = replace(middle, mean_input_len=middle.mean_input_len + 1)
    assert running not in capacity
    floor = capacity_of(task_t, running, list(capacity.items()))
    assert floor == pytest.approx(capacity[middle], rel=0.05)
    assert any(c < KEEP_SHARE * floor for c in capacity.values())  # the floor has something to exclude
    kept = pick(task_t, slo, 20.0, current=running, keep_capacity=True)
    in_force = next(w for w in kept.weighed if w.schedule == running)
    assert in_force.capacity_seq_s == pytest.approx(floor)
    assert all(w.capacity_seq_s >= KEEP_SHARE * floor for w in kept.weighed if w.schedule != running)


def test_the_largest_schedule_in_force_still_has_peers_of_about_its_capacity_weighed():
    """The schedule in force has the most capacity on the search's scale (a large mixed batch)
    and misses the SLO at the rate: peers within the search's error of it are weighed, so
    keeping the capacity cannot mean keeping it alone; a far smaller one is not."""
    largest, peer, small = (
        Schedule("mixed", encode_batch=16, decode_batch=16),
        Schedule("rra", encode_batch=31, decode_batch=31, decode_iters_per_encode=6),
        Schedule("rra", encode_batch=2, decode_batch=3, decode_iters_per_encode=7),
    )
    found = [(largest, 18.8), (peer, 18.5), (small, 12.1)]
    weighed = [s for s, _ in to_weigh(found, Forecast(11.2, 1.0), largest, KEEP_SHARE * 18.8)]
    assert weighed == [peer]
    assert [s for s, _ in to_weigh(found, Forecast(11.2, 1.0), largest, 0.0)] == [peer, small]


def test_an_attainment_observed_below_the_prediction_caps_the_schedule_in_force(task_t):
    """The model says the schedule in force meets the SLO; the mesh saw 20 % meet it: the
    search weighs it at what was seen, and picks another."""
    slo = Slo(e2e_s=0.5)
    running = pick(task_t, slo, 20.0).best.schedule
    believed = pick(task_t, slo, 20.0, current=running)
    assert believed.best.schedule == running  # on the model alone it stays the best
    seen = pick(task_t, slo, 20.0, current=running, observed={running: 0.2})
    in_force = next(w for w in seen.weighed if w.schedule == running)
    assert in_force.attainment == 0.2 and seen.best.schedule != running and seen.reaches_target


def test_a_shortfall_measured_caps_the_schedules_alike_the_one_measured():
    """RRA 29/32 at N_D 7 met the SLO for 93 % where the model said 100 %: its twin 31/32 is no
    escape (the model errs alike on both); a schedule of other batch sizes or policy is weighed
    at the model's figure."""
    measured = Schedule("rra", encode_batch=29, decode_batch=32, decode_iters_per_encode=7)
    twin = replace(measured, encode_batch=31)
    others = (
        replace(measured, encode_batch=4, decode_batch=6, decode_iters_per_encode=3),
        replace(measured, decode_iters_per_encode=3),
        replace(measured, policy="continuous"),
    )
    assert alike(measured, twin) and not any(alike(measured, o) for o in others)
    mixed = Schedule("mixed", encode_batch=16, decode_batch=16, chunk_tokens=128)
    assert alike(mixed, Schedule("continuous", encode_batch=15, decode_batch=15))  # one family
    assert not alike(mixed, replace(mixed, chunk_tokens=256))  # another chunk is another mixed batch
    assert not alike(mixed, Schedule("static", encode_batch=16, decode_batch=16))
    figures = SloFigures(0.996, 0.5, 0.05, 0.8, True, 300, 0.6)
    out = seen([Weighed(s, 18.0, figures) for s in (measured, twin, *others)], {measured: 0.932})
    assert [w.attainment for w in out] == [0.932, 0.932, 0.996, 0.996, 0.996]


def test_every_schedule_measured_short_lately_is_weighed_at_what_was_measured(task_t):
    """The schedule before the one in force failed too: the search does not go back to it on
    the model's word."""
    slo = Slo(e2e_s=0.5)
    first = pick(task_t, slo, 20.0).best.schedule
    second = pick(task_t, slo, 20.0, current=first, observed={first: 0.2}).best.schedule
    # with only the schedule in force's shortfall, the model's favourite comes back
    assert pick(task_t, slo, 20.0, current=second, observed={second: 0.3}).best.schedule == first
    third = pick(task_t, slo, 20.0, current=second, observed={first: 0.2, second: 0.3})
    assert third.best.schedule not in (first, second) and third.reaches_target
    capped = {w.schedule: w.attainment for w in third.weighed if w.schedule in (first, second)}
    assert capped.get(first, 0.2) == 0.2 and capped.get(second, 0.3) == 0.3


def test_the_forecast_takes_the_higher_of_the_recent_rates():
    assert forecast([], 1.0) == Forecast(0.0, 1.0)
    rising = [2.0] * 30 + [10.0] * 10  # the last 10 s at 10/s
    assert forecast(rising, 1.3).rate_per_s == pytest.approx(10.0)
    falling = [10.0] * 30 + [2.0] * 10
    assert forecast(falling, 1.0).rate_per_s == pytest.approx((20 * 10 + 10 * 2) / 30)
    assert forecast([1.0] * 5, math.nan).cv == 1.0
