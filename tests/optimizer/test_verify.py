"""A plan checked in the simulator: kept when it meets its bound there, searched again otherwise."""

import math

import pytest

from optimizer.schedule import Schedule
from optimizer.search import SearchResult, branch_and_bound
from optimizer.verify import ProbeLoad, outstanding, requests_for, simulated_figures, verified_search

TIGHT = 0.5  # OPT-13B, task S, 4 H200s: the search's own pick overruns this in simulation
LOOSE = 2.0  # and meets this one


def figures_of(sc, schedule):
    return simulated_figures(sc, schedule, ProbeLoad.draw(sc.workload, requests_for(schedule)))


def test_probes_are_every_tenth_request_at_the_99th_percentile_lengths(opt13b_s):
    load = ProbeLoad.draw(opt13b_s.workload, 40, seed=3)
    w = opt13b_s.workload
    probes = [r for r in load.requests if r.request_id in load.probes]
    assert [load.requests.index(r) for r in probes] == [9, 19, 29, 39]
    assert {(r.input_len, r.output_len) for r in probes} == {
        (int(w.input.quantile(0.99)), int(w.output.quantile(0.99)))
    }
    assert load.first(15).probes == {load.requests[9].request_id}


def test_the_closed_loop_fills_every_slot():
    replicas = Schedule(
        "continuous", encode_batch=8, decode_batch=8, num_devices=2, decoder_devices=2, worker_devices=1
    )
    split = Schedule(
        "waa-c", encode_batch=4, decode_batch=10, num_devices=2, encoder_devices=1, decoder_devices=1, worker_devices=1
    )
    assert outstanding(replicas) == 16 and outstanding(split) == 10  # the decoders' slots: credits cap the encoder
    assert requests_for(replicas, 10) == 64 and requests_for(replicas, 100) == 100


def test_a_pick_that_overruns_in_simulation_is_replaced_by_one_that_meets_the_bound(opt13b_s):
    plain = branch_and_bound(opt13b_s, TIGHT).best
    assert figures_of(opt13b_s, plain.schedule).p99_length_latency_s > TIGHT  # the case this is for

    verified = verified_search(opt13b_s, TIGHT)
    assert verified.best is not None and verified.best.schedule != plain.schedule
    assert verified.simulated.p99_length_latency_s <= TIGHT
    assert verified.searches > 1 and verified.searched_bound_s < TIGHT
    assert figures_of(opt13b_s, verified.best.schedule) == verified.simulated  # deterministic


def test_a_pick_that_meets_the_bound_in_simulation_is_the_search_pick(opt13b_s):
    verified = verified_search(opt13b_s, LOOSE)
    assert verified.searches == 1 and verified.searched_bound_s == LOOSE
    assert verified.best.schedule == branch_and_bound(opt13b_s, LOOSE).best.schedule
    assert verified.simulated.p99_length_latency_s <= LOOSE


def test_no_bound_is_one_search_with_simulated_figures(opt13b_s):
    verified = verified_search(opt13b_s, math.inf)
    assert verified.searches == 1 and verified.best is not None
    assert verified.simulated.throughput_seq_s > 0


def test_it_gives_up_after_its_tries_with_each_bound_tighter(opt13b_s):
    overrunning = branch_and_bound(opt13b_s, TIGHT)
    bounds = []

    def stubborn(sc, bound, policies, space) -> SearchResult:
        bounds.append(bound)
        return overrunning  # always the pick that overruns

    verified = verified_search(opt13b_s, TIGHT, search=stubborn, tries=3)
    assert verified.best is None and not verified.meets_bound and verified.searches == 3
    assert bounds[0] == TIGHT and bounds[0] > bounds[1] > bounds[2]
    assert verified.evaluations == 3 * overrunning.evaluations
    with pytest.raises(ValueError):
        verified_search(opt13b_s, TIGHT, tries=0)


def test_the_product_pick_meets_its_bound_in_simulation_and_beats_every_checked_group(opt13b_s):
    from optimizer.search import PRODUCT_POLICIES, SEARCH_POLICIES
    from optimizer.verify import verified_pick

    pick = verified_pick(opt13b_s, TIGHT)
    assert pick.best.best is not None and pick.best.simulated.p99_length_latency_s <= TIGHT
    assert figures_of(opt13b_s, pick.best.best.schedule) == pick.best.simulated
    groups = {g: v for g, v in pick.by_group.items()}
    assert set(groups) == {PRODUCT_POLICIES, SEARCH_POLICIES, ("static",), ("continuous",)}
    best = pick.best.best.figures.throughput_seq_s
    for verified in groups.values():
        if verified.best is not None:
            assert verified.simulated.p99_length_latency_s <= TIGHT
            assert best >= verified.best.figures.throughput_seq_s
    assert pick.best.best.schedule.policy in pick.policies


def test_the_ladder_takes_picks_best_first_and_simulates_each_once(opt13b_s):
    from optimizer.verify import LADDER

    picks = [branch_and_bound(opt13b_s, TIGHT * f) for f in LADDER[:4]]
    thr = [p.best.figures.throughput_seq_s for p in picks if p.best]
    assert thr == sorted(thr, reverse=True)  # a tighter bound never gives more
    calls = []

    def counting(sc, bound, policies, space):
        calls.append(bound)
        return branch_and_bound(sc, bound, policies, space)

    verified = verified_search(opt13b_s, TIGHT, search=counting, tries=4, refine=0)
    assert calls == [TIGHT * f for f in LADDER[: len(calls)]] and verified.searches == len(calls)


def test_a_better_pick_between_two_steps_of_the_ladder_is_found_by_bisection(opt13b_s):
    """The ladder's steps are coarse: between the step whose pick overran and the first whose pick
    met the bound lies a pick with more throughput that meets it too, and bisection finds it."""
    from dataclasses import replace

    from optimizer.search import Candidate
    from optimizer.verify import LADDER

    overran = branch_and_bound(opt13b_s, TIGHT)
    met = verified_search(opt13b_s, TIGHT, refine=0)
    assert met.searches == 2 and met.searched_bound_s == pytest.approx(TIGHT * LADDER[1])  # the case this is for
    smaller = replace(met.best.schedule, decode_batch=met.best.schedule.decode_batch - 1)
    assert figures_of(opt13b_s, smaller).p99_length_latency_s <= TIGHT
    better = replace(
        met,
        best=Candidate(smaller, replace(met.best.figures, throughput_seq_s=met.best.figures.throughput_seq_s * 1.05)),
    )
    calls = []

    def stepped(sc, bound, policies, space):  # overruns above 99 % of the bound, `better` down to 97.5 %
        calls.append(bound / TIGHT)
        return (
            overran
            if bound > 0.99 * TIGHT
            else replace(met.last, best=better.best)
            if bound > 0.975 * TIGHT
            else met.last
        )

    verified = verified_search(opt13b_s, TIGHT, search=stepped, refine=3)
    assert verified.best.schedule == smaller and verified.simulated.p99_length_latency_s <= TIGHT
    assert calls[:2] == [1.0, LADDER[1]] and len(calls) == 5
    assert all(LADDER[1] < f < 1.0 for f in calls[2:])
    assert LADDER[1] < verified.searched_bound_s / TIGHT <= 0.99
