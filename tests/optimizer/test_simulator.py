"""The event-driven simulation drives the policies; the analytic fast path must agree with it."""

import math

import numpy as np
import pytest

from optimizer import analytic
from optimizer.analytic import Scenario, WorkloadStats
from optimizer.cluster import H200_CLUSTER
from optimizer.lengths import TASKS
from optimizer.model import MODELS
from optimizer.schedule import Schedule
from optimizer.simulator import requests_from_workload, simulate

THROUGHPUT_TOL = 0.10  # analytic vs simulated, saturated
LATENCY_TOL = 0.20  # latency of a 99th-percentile-length output


def _reqs(sc, n=600, seed=0, rate=0.0):
    return requests_from_workload(sc, np.random.default_rng(seed), n, rate)


CASES = {
    "rra": (
        Schedule(
            "rra",
            encode_batch=16,
            decode_batch=10_000,
            decode_iters_per_encode=4,
            tp_degree=4,
            tp_stages=1,
            num_devices=4,
            decoder_devices=4,
        ),
        lambda sc, st: analytic.rra(sc, st, sc.layout(4, 4, 1), 16, 4, 1),
    ),
    "rra-pipelined": (
        Schedule(
            "rra",
            encode_batch=8,
            decode_batch=10_000,
            decode_microbatches=2,
            decode_iters_per_encode=3,
            tp_degree=2,
            tp_stages=1,
            num_devices=4,
            decoder_devices=4,
        ),
        lambda sc, st: analytic.rra(sc, st, sc.layout(4, 2, 1), 8, 3, 2),
    ),
    "waa": (
        Schedule(
            "waa-c",
            encode_batch=4,
            decode_batch=10_000,
            tp_degree=2,
            tp_stages=2,
            num_devices=4,
            encoder_devices=2,
            decoder_devices=2,
        ),
        lambda sc, st: analytic.waa(sc, st, sc.layout(2, 2, 1), sc.layout(2, 2, 1, 2), 4, 10_000, 1),
    ),
    "continuous": (
        Schedule(
            "continuous", encode_batch=48, decode_batch=48, tp_degree=4, tp_stages=1, num_devices=4, decoder_devices=4
        ),
        lambda sc, st: analytic.continuous(sc, st, sc.layout(4, 4, 1), 48, 1),
    ),
    "static": (
        Schedule(
            "static", encode_batch=16, decode_batch=16, tp_degree=4, tp_stages=1, num_devices=4, decoder_devices=4
        ),
        lambda sc, st: analytic.static(sc, st, sc.layout(4, 4, 1), 16, 1),
    ),
}


@pytest.fixture(scope="module")
def runs(opt13b_s):
    reqs = _reqs(opt13b_s)
    stats = WorkloadStats(opt13b_s.workload)
    return {k: (simulate(opt13b_s, s, reqs), f(opt13b_s, stats)) for k, (s, f) in CASES.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_analytic_throughput_agrees_with_the_simulation(runs, case):
    sim, pred = runs[case]
    assert sim.throughput_seq_s == pytest.approx(float(pred.throughput_seq_s), rel=THROUGHPUT_TOL)


@pytest.mark.parametrize("case", ["rra", "rra-pipelined", "waa", "continuous"])
def test_analytic_p99_length_latency_agrees_with_the_simulation(runs, case):
    sim, pred = runs[case]
    assert sim.latency_p99_len_s == pytest.approx(float(pred.latency_p99_s), rel=LATENCY_TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_request_gets_exactly_its_tokens_once(runs, case):
    sim, _ = runs[case]
    assert len(sim.records) == 600 and len({r.request_id for r in sim.records}) == 600
    assert all(r.tokens == r.output_len for r in sim.records)
    decoded = sum(s.batch for s in sim.decode_steps)
    assert decoded + len(sim.records) == sum(r.output_len for r in sim.records)  # prefill makes one each
    assert all(r.arrival_s <= r.encode_start_s < r.first_token_s <= r.finish_s for r in sim.records)


def test_waa_keeps_littles_law_between_encode_rate_decode_batch_and_output_length(runs, opt13b_s):
    sim, pred = runs["waa"]
    steps = sim.decode_steps[len(sim.decode_steps) // 5 : 4 * len(sim.decode_steps) // 5]
    encoded_per_iteration = (steps[-1].encoded_before - steps[0].encoded_before) / len(steps)
    mean_iters = WorkloadStats(opt13b_s.workload).mean_decode_iters
    mean_batch = np.mean([s.batch for s in steps])
    assert mean_batch == pytest.approx(encoded_per_iteration * mean_iters, rel=0.1)
    # the analytic model is built on the same law: B_D = rate x E[o-1] x iteration time
    assert float(pred.decode_batch) == pytest.approx(
        float(pred.throughput_seq_s) * mean_iters * float(pred.tpot_s), rel=1e-3
    )


def test_simulation_is_deterministic_given_the_generator(opt13b_s):
    sched = CASES["rra"][0]
    a = simulate(opt13b_s, sched, _reqs(opt13b_s, 200, seed=3))
    b = simulate(opt13b_s, sched, _reqs(opt13b_s, 200, seed=3))
    assert a.records == b.records


def test_below_capacity_throughput_follows_arrivals_and_latency_drops(opt13b_s):
    sched = CASES["continuous"][0]
    saturated = simulate(opt13b_s, sched, _reqs(opt13b_s, 400))
    light = simulate(opt13b_s, sched, _reqs(opt13b_s, 400, rate=0.3 * saturated.throughput_seq_s))
    assert light.throughput_seq_s == pytest.approx(0.3 * saturated.throughput_seq_s, rel=0.2)
    assert light.e2e_s["p99"] < saturated.e2e_s["p99"]
    assert light.ttft_s["p50"] < light.e2e_s["p50"] and light.tpot_s["p50"] > 0


def test_overload_queues_requests(opt13b_s):
    sched = CASES["rra"][0]
    sat = simulate(opt13b_s, sched, _reqs(opt13b_s, 300))
    over = simulate(opt13b_s, sched, _reqs(opt13b_s, 300, rate=3 * sat.throughput_seq_s))
    waits = [r.encode_start_s - r.arrival_s for r in over.records]
    assert max(waits) > 10 * min(waits) and max(waits) > 0.1


def test_a_schedule_that_overflows_memory_is_reported_infeasible(profile):
    sc = Scenario(MODELS["opt-66b"], profile, H200_CLUSTER, TASKS["C2"], 1)
    sched = Schedule("continuous", encode_batch=512, decode_batch=512, num_devices=1)
    sim = simulate(sc, sched, _reqs(sc, 80))
    assert not sim.fits_memory
    pred = analytic.continuous(sc, WorkloadStats(sc.workload), sc.layout(1, 1, 0), 512, 1)
    assert not bool(pred.feasible)


def test_empty_request_list_rejected(opt13b_s):
    with pytest.raises(ValueError):
        simulate(opt13b_s, CASES["rra"][0], ())


def test_no_nan_in_a_normal_run(runs):
    sim, _ = runs["rra"]
    assert not any(math.isnan(v) for v in (sim.throughput_seq_s, sim.mean_decode_batch, sim.latency_p99_len_s))


def test_goodput_and_fraction_within_bound_follow_their_slos(runs):
    from optimizer.simulator import goodput_seq_s, within_bound

    sim, _ = runs["continuous"]
    assert goodput_seq_s(sim, math.inf, math.inf) == pytest.approx(sim.throughput_seq_s)
    assert goodput_seq_s(sim, 0.0, 0.0) == 0.0
    strict = goodput_seq_s(sim, sim.ttft_s["p50"], sim.tpot_s["p50"])
    assert 0 < strict < sim.throughput_seq_s
    assert within_bound(sim, sim.e2e_s["p90"]) == pytest.approx(0.9, abs=0.02)
    assert within_bound(sim, math.inf) == 1.0


@pytest.mark.parametrize(
    "policies, bound_s", [(("rra",), 1.0), (("waa-c", "waa-m"), 1.0), (("rra",), math.inf), (("waa-c", "waa-m"), 0.42)]
)  # decoder-bound: encoder waits
def test_searched_schedules_run_as_predicted(opt13b_s, policies, bound_s):
    from optimizer.search import branch_and_bound

    best = branch_and_bound(opt13b_s, bound_s, policies).best
    slots = best.figures.decode_batch_peak * max(
        best.schedule.decoder_workers, best.schedule.workers - best.schedule.encoder_workers
    )
    n = int(min(max(600, 7 * slots), 6500))  # several batch turnovers of every worker
    sim = simulate(opt13b_s, best.schedule, _reqs(opt13b_s, n))
    assert sim.throughput_seq_s == pytest.approx(best.figures.throughput_seq_s, rel=THROUGHPUT_TOL)
    assert sim.latency_p99_len_s == pytest.approx(best.figures.latency_p99_s, rel=LATENCY_TOL)
    assert sim.fits_memory and sim.peak_running <= best.schedule.decode_batch


@pytest.fixture(scope="module")
def two_workers(profile):
    """OPT-1.3B on two single-device workers (a cluster of worker processes, as on a CPU host)."""
    from dataclasses import replace

    cluster = replace(H200_CLUSTER, device_threads=1, devices_per_node=2)
    return Scenario(MODELS["opt-1.3b"], profile, cluster, TASKS["S"], 2)


@pytest.mark.parametrize(
    "schedule",
    [
        Schedule(
            "rra",
            encode_batch=8,
            decode_batch=400,
            decode_iters_per_encode=4,
            num_devices=2,
            decoder_devices=2,
            worker_devices=1,
        ),
        Schedule("continuous", encode_batch=32, decode_batch=32, num_devices=2, decoder_devices=2, worker_devices=1),
        Schedule(
            "waa-c",
            encode_batch=4,
            decode_batch=400,
            num_devices=2,
            encoder_devices=1,
            decoder_devices=1,
            worker_devices=1,
        ),
    ],
    ids=lambda s: s.policy,
)
def test_workers_as_replicas_or_a_split_run_as_the_analytic_model_says(two_workers, schedule):
    from optimizer.search import families

    sc = two_workers
    stats = WorkloadStats(sc.workload)
    sim = simulate(sc, schedule, _reqs(sc, 800))
    layout = sc.layout(1, 1, 0)
    if schedule.policy == "waa-c":
        pred = analytic.waa(sc, stats, layout, sc.layout(1, 1, 0, 1), 4, 400, 1)
    elif schedule.policy == "rra":
        pred = analytic.replicated(analytic.rra(sc, stats, layout, 8, 4, 1), 2)
    else:
        pred = analytic.replicated(analytic.continuous(sc, stats, layout, 32, 1), 2)
    assert sim.throughput_seq_s == pytest.approx(float(pred.throughput_seq_s), rel=THROUGHPUT_TOL)
    assert schedule.workers == 2
    fams = families(sc, ("rra", "waa-c", "continuous"))
    assert {f.policy for f in fams} == {"rra", "waa-c", "continuous"}


def test_a_plan_for_worker_processes_names_its_workers(two_workers):
    from optimizer.search import branch_and_bound

    for policies in (("rra",), ("waa-c", "waa-m"), ("static",), ("continuous",)):
        best = branch_and_bound(two_workers, math.inf, policies).best.schedule
        assert best.worker_devices == 1 and best.workers == 2 and best.tp_degree == 1
        assert (best.encoder_workers, best.decoder_workers) == ((1, 1) if best.split else (0, 0))


def test_a_closed_loop_keeps_its_requests_outstanding_and_load_figures_read_its_saturated_part(opt13b_s):
    from optimizer.simulator import Completion, load_figures

    sched = CASES["continuous"][0]
    reqs = _reqs(opt13b_s, 400)
    sim = simulate(opt13b_s, sched, reqs, closed_loop=40)
    events = sorted([(r.arrival_s, 1) for r in sim.records] + [(r.finish_s, -1) for r in sim.records])
    outstanding, most = 0, 0
    for _, change in events:
        outstanding += change
        most = max(most, outstanding)
    assert most == 40 and len(sim.records) == 400
    assert sum(r.arrival_s == 0 for r in sim.records) == 40  # the rest arrive as others finish
    done = [Completion(r.request_id, r.arrival_s, r.finish_s) for r in sim.records]
    probes = {r.request_id for r in sim.records[::10]}
    figures = load_figures(done, probes, outstanding=40)
    finish = sorted(r.finish_s for r in sim.records)
    inside = sum(finish[39] < f <= finish[359] for f in finish)  # after the first wave, before the drain
    assert figures.throughput_seq_s == pytest.approx(inside / (finish[359] - finish[39]))
    expected = np.median(
        [
            r.finish_s - r.arrival_s
            for r in sim.records
            if r.request_id in probes and finish[39] < r.finish_s <= finish[359]
        ]
    )
    assert figures.p99_length_latency_s == pytest.approx(expected)


def test_a_closed_loop_delay_fills_a_freed_slot_at_a_later_boundary(opt13b_s):
    sched = CASES["continuous"][0]
    reqs = _reqs(opt13b_s, 200)
    prompt = simulate(opt13b_s, sched, reqs, closed_loop=20)
    delayed = simulate(opt13b_s, sched, reqs, closed_loop=20, loop_delay_s=1e-4)
    finished = {r.request_id: r.finish_s for r in delayed.records}
    later = [r for r in delayed.records if r.arrival_s > 0]
    assert later and all(any(abs(r.arrival_s - 1e-4 - f) < 1e-9 for f in finished.values()) for r in later)
    assert all(r.encode_start_s > r.arrival_s for r in later)  # it waited for the next boundary
    assert delayed.throughput_seq_s < prompt.throughput_seq_s
    with pytest.raises(ValueError):
        simulate(opt13b_s, sched, reqs, closed_loop=20, loop_delay_s=-1.0)


def test_a_step_that_prefills_and_decodes_is_costed_as_the_engine_runs_it(opt13b_s):
    """One forward over prompts and decode rows (mixed; continuous without decode micro-batches),
    else a prefill pass that stalls the decode micro-batches and then the decode iteration."""
    from optimizer.policies import fused_steps
    from optimizer.profile import StepShape
    from optimizer.simulator import _Costs

    assert fused_steps(Schedule("continuous")) and fused_steps(Schedule("mixed", decode_batch=16))
    assert not fused_steps(Schedule("continuous", decode_microbatches=2))
    assert not any(fused_steps(Schedule(p)) for p in ("static", "rra", "waa-c"))
    timer = opt13b_s.timer(opt13b_s.layout(1, 1, 0))
    step = StepShape(prefill_seqs=2, prefill_tokens=300, prefill_seq=150, decode_seqs=30, decode_ctx=400)
    one_pass, two_passes = _Costs(timer, 1, fused=True), _Costs(timer, 1)
    assert one_pass.iteration_s(step) == pytest.approx(float(timer.iteration_s(step, 1)))
    assert two_passes.iteration_s(step) == pytest.approx(float(timer.mixed_s(step, 1)))
    assert one_pass.iteration_s(step) < two_passes.iteration_s(step)  # the step's fixed work is paid once


def test_simulations_of_one_scenario_share_step_times_and_give_what_fresh_ones_give(opt13b_s):
    """A search weighs many schedules on one scenario; the step times its simulations computed
    are reused by the next ones (kept with the scenario), and a simulation reads the same
    records from them as from a scenario that computed nothing yet."""
    from dataclasses import replace

    reqs = _reqs(opt13b_s, n=300, rate=20.0)
    shared = replace(opt13b_s)
    for name in ("continuous", "rra", "waa", "static"):
        schedule = CASES[name][0]
        simulate(shared, schedule, reqs)
        again = simulate(shared, schedule, reqs)  # every step time from the memo
        fresh = simulate(replace(opt13b_s), schedule, reqs)
        assert again.records == fresh.records
        assert again.decode_steps == fresh.decode_steps
    kept = [memo for key, memo in shared.__dict__["_memo"].items() if key[0] == "step times"]
    assert kept and all(memo for memo in kept)


def test_replica_workers_take_arrivals_in_turn_as_the_broker_delivers_them(two_workers):
    """The broker delivers each arrival to the next worker in turn (RabbitMQ's round robin under
    each worker's prefetch): the third request waits for the first worker's long prefill even
    though the second worker is idle by then; and none is delivered beyond a worker's B_D."""
    from optimizer.simulator import SimRequest

    sc = two_workers
    schedule = Schedule(
        "continuous", encode_batch=1, decode_batch=2, num_devices=2, decoder_devices=2, worker_devices=1
    )
    reqs = (SimRequest("long", 2000, 2, 0.0), SimRequest("short-1", 8, 2, 0.001), SimRequest("short-2", 8, 2, 0.002))
    rec = {r.request_id: r for r in simulate(sc, schedule, reqs).records}
    assert rec["short-1"].finish_s < rec["long"].first_token_s  # the second worker was done long before
    assert rec["short-2"].encode_start_s >= rec["long"].first_token_s  # yet the third went to the first

    # five at once on workers of B_D = 2: two each, the fifth waits in the broker for a finish
    burst = tuple(SimRequest(f"r{i}", 8, 3, 0.0) for i in range(5))
    rec = {r.request_id: r for r in simulate(sc, schedule, burst).records}
    first_done = min(r.finish_s for r in rec.values())
    assert sorted(r.request_id for r in rec.values() if r.encode_start_s < first_done) == ["r0", "r1", "r2", "r3"]
    assert rec["r4"].encode_start_s >= first_done
