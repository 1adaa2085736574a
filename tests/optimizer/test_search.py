import math

import numpy as np
import pytest

from optimizer.analytic import Scenario
from optimizer.cluster import H200_CLUSTER
from optimizer.lengths import TASKS
from optimizer.model import MODELS
from optimizer.search import SearchSpace, Tolerances, branch_and_bound, exhaustive, families, least_latency, tp_configs

SMALL = SearchSpace(
    max_encode_batch=48,
    waa_max_encode_batch=24,
    static_max_batch=64,
    continuous_max_batch=96,
    iters_per_encode=(1, 2, 4, 7, 16),
    decode_caps=(8, 32, 128, 512, 2048),
    microbatches=(1, 2),
)


@pytest.mark.parametrize("model, devices, task", [("opt-13b", 4, "S"), ("opt-13b", 2, "T"), ("opt-1.3b", 2, "C2")])
@pytest.mark.parametrize("bound_s", [0.4, 1.5, 6.0, math.inf])
@pytest.mark.parametrize("policies", [("rra", "waa-c", "waa-m"), ("static",), ("continuous",)])
def test_branch_and_bound_finds_the_exhaustive_optimum(profile, model, devices, task, bound_s, policies):
    sc = Scenario(MODELS[model], profile, H200_CLUSTER, TASKS[task], devices)
    tol = Tolerances()
    bb = branch_and_bound(sc, bound_s, policies, SMALL, tol)
    ex = exhaustive(sc, bound_s, policies, SMALL)
    assert (bb.best is None) == (ex.best is None)
    if ex.best:
        assert bb.best.figures.throughput_seq_s == pytest.approx(ex.best.figures.throughput_seq_s, rel=tol.eps_t)
        assert bb.best.figures.latency_p99_s <= bound_s


@pytest.mark.parametrize("bound_s", [1.0, math.inf])
def test_branch_and_bound_evaluates_a_fraction_of_the_full_space(opt13b_s, bound_s):
    bb, ex = branch_and_bound(opt13b_s, bound_s), exhaustive(opt13b_s, bound_s)
    assert bb.best.figures.throughput_seq_s == pytest.approx(ex.best.figures.throughput_seq_s, rel=0.01)
    assert bb.evaluations < ex.evaluations / 3 and bb.families_pruned > 0


def test_tighter_bound_never_gives_more_throughput(opt13b_s):
    figures = [branch_and_bound(opt13b_s, b, space=SMALL).best.figures for b in (0.5, 1.0, 2.0, math.inf)]
    thr = [f.throughput_seq_s for f in figures]
    assert thr == sorted(thr)
    assert all(f.latency_p99_s <= b for f, b in zip(figures, (0.5, 1.0, 2.0)))


def test_impossible_bound_gives_no_schedule(opt13b_s):
    result = branch_and_bound(opt13b_s, 1e-3, space=SMALL)
    assert result.best is None and result.families_pruned == result.families


def test_chosen_schedule_describes_its_layout(opt13b_s):
    s = branch_and_bound(opt13b_s, math.inf, space=SMALL).best.schedule
    assert s.num_devices == 4
    if s.policy.startswith("waa"):
        assert s.encoder_devices + s.decoder_devices == 4 and s.encoder_devices % s.tp_degree == 0
    else:
        assert s.tp_degree * s.tp_stages <= 4


def test_tp_configurations_include_partial_tp(opt13b_s):
    configs = tp_configs(opt13b_s)
    assert (1, 0) in configs and (2, 1) in configs and (2, 2) in configs and (4, 1) in configs
    assert all(k * s <= 4 for k, s in configs)


@pytest.mark.parametrize(
    "build",
    [
        lambda sc: branch_and_bound(sc, 1.0, ("fcfs",)),
        lambda sc: SearchSpace(max_encode_batch=0),
        lambda sc: Tolerances(eps_t=-1),
    ],
)
def test_bad_search_inputs_rejected(opt13b_s, build):
    with pytest.raises(ValueError):
        build(opt13b_s)


@pytest.mark.parametrize("policy", ["static", "rra", "continuous"])
def test_bound_just_above_the_fastest_schedule_is_found(opt13b_s, policy):
    """Where latency is nearly flat in the batch, the answer sits right above batch 1."""
    floor = min(
        float(f.run(np.ones(f.size, dtype=int), np.arange(f.size)).latency_p99_s.min())
        for f in families(opt13b_s, (policy,), SMALL)
    )
    bound = floor * 1.0005
    bb = branch_and_bound(opt13b_s, bound, (policy,), SMALL)
    ex = exhaustive(opt13b_s, bound, (policy,), SMALL)
    assert ex.best is not None and bb.best is not None
    assert bb.best.figures.throughput_seq_s == pytest.approx(ex.best.figures.throughput_seq_s, rel=0.005)


def test_a_capped_space_keeps_every_batch_a_worker_runs_within_the_cap(profile):
    import math as _math

    from optimizer.search import SEARCH_POLICIES, SearchSpace, branch_and_bound

    sc = Scenario(MODELS["opt-13b"], profile, H200_CLUSTER, TASKS["S"], 4)
    space = SearchSpace().capped(24)
    assert max(space.decode_caps) == 24 and space.max_encode_batch == 24
    for policies in (SEARCH_POLICIES, ("static",), ("continuous",)):
        best = branch_and_bound(sc, _math.inf, policies, space).best
        s = best.schedule
        assert s.encode_batch <= 24 and s.decode_batch <= 24 and best.figures.decode_batch_peak <= 24 + 1e-9
    uncapped = branch_and_bound(sc, _math.inf, ("rra",)).best
    assert uncapped.schedule.decode_batch > 24  # the cap binds here


@pytest.mark.parametrize("model, devices, task", [("opt-13b", 4, "S"), ("opt-13b", 2, "T")])
def test_least_latency_is_the_floor_of_every_bound(profile, model, devices, task):
    """Nothing meets a bound just below the least latency; at it, the search finds a schedule."""
    sc = Scenario(MODELS[model], profile, H200_CLUSTER, TASKS[task], devices)
    policies = ("rra", "waa-c", "waa-m", "static", "continuous")
    quickest = least_latency(sc, policies, SMALL).best
    floor = quickest.figures.latency_p99_s
    assert exhaustive(sc, floor * 0.999, policies, SMALL).best is None
    at_floor = exhaustive(sc, floor * 1.0001, policies, SMALL).best
    assert at_floor is not None and at_floor.figures.latency_p99_s == pytest.approx(floor, rel=1e-3)


def test_workers_that_are_process_groups_get_schedules_of_their_shape(profile):
    """Workers announce their group (TP degree per stage): the search plans within that shape."""
    from dataclasses import replace

    cpu_like = replace(H200_CLUSTER, device_threads=1)  # one process per device, as on CPU hosts
    free = Scenario(MODELS["opt-13b"], profile, cpu_like, TASKS["S"], 4)
    grouped = Scenario(MODELS["opt-13b"], profile, cpu_like, TASKS["S"], 4, group=(2,))
    assert free.worker_devices == 1 and grouped.worker_devices == 2 and grouped.worker_count == 2
    best = branch_and_bound(grouped, math.inf, ("rra", "continuous", "waa-c")).best
    assert best is not None
    assert (best.schedule.tp_degree, best.schedule.worker_devices) == (2, 2)
    partial = Scenario(MODELS["opt-13b"], profile, cpu_like, TASKS["S"], 6, group=(2, 1))
    assert partial.group_tp() == (2, 1) and partial.worker_devices == 3
    with pytest.raises(ValueError, match="tp=16"):
        Scenario(MODELS["opt-13b"], profile, cpu_like, TASKS["S"], 16, group=(16,))


def test_a_cluster_file_can_say_that_workers_are_process_groups(profile):
    from dataclasses import replace

    from optimizer.cluster import cluster_to_dict, parse_cluster

    grouped = replace(H200_CLUSTER, device_threads=1, worker_group=(2,))
    assert parse_cluster(cluster_to_dict(grouped)) == grouped
    sc = Scenario(MODELS["opt-13b"], profile, grouped, TASKS["S"], 4)
    assert sc.group == (2,) and sc.worker_devices == 2
    with pytest.raises(ValueError, match="worker_group"):
        parse_cluster({**cluster_to_dict(grouped), "worker_group": [0]})


# --- soundness: the branch and bound is the exhaustive search, faster -------------------------

TINY = SearchSpace(
    max_encode_batch=40,
    waa_max_encode_batch=12,
    static_max_batch=48,
    continuous_max_batch=64,
    iters_per_encode=(1, 3, 8, 32),
    decode_caps=(4, 16, 64, 256, 1024),
    microbatches=(1, 2),
)


@pytest.mark.parametrize(
    "model, devices, task, bound_s",
    [
        ("opt-1.3b", 2, "S", math.inf),
        ("opt-1.3b", 2, "S", 0.3),
        ("opt-1.3b", 1, "G", math.inf),
        ("opt-13b", 4, "C1", 0.9),
        ("opt-13b", 4, "G", math.inf),
        ("opt-13b", 3, "T", 2.5),
        ("opt-66b", 8, "C2", math.inf),
        ("t5-11b", 4, "S", 1.0),
        ("gpt3-175b", 16, "S", 3.0),
    ],
)
@pytest.mark.parametrize("policies", [("rra",), ("waa-c", "waa-m"), ("static",), ("continuous",)])
def test_branch_and_bound_equals_exhaustive_on_small_spaces(profile, model, devices, task, bound_s, policies):
    sc = Scenario(MODELS[model], profile, H200_CLUSTER, TASKS[task], devices)
    bb = branch_and_bound(sc, bound_s, policies, TINY)
    ex = exhaustive(sc, bound_s, policies, TINY)
    assert (bb.best is None) == (ex.best is None)
    if ex.best:
        assert bb.best.figures.throughput_seq_s == pytest.approx(ex.best.figures.throughput_seq_s, rel=1e-9)
        assert bb.best.figures.latency_p99_s <= bound_s


def test_an_optimum_inside_a_line_is_found(profile):
    """OPT-1.3B on 2 devices, task S, no bound: RRA's throughput is not monotone in B_E, and its
    best B_E (64) lies below the largest one that fits."""
    sc = Scenario(MODELS["opt-1.3b"], profile, H200_CLUSTER, TASKS["S"], 2)
    bb, ex = branch_and_bound(sc, math.inf), exhaustive(sc, math.inf)
    assert bb.best.schedule == ex.best.schedule
    assert (bb.best.schedule.policy, bb.best.schedule.encode_batch) == ("rra", 64)


def test_eps_t_bounds_the_gap_from_below(profile):
    """With eps_t the answer is at most that fraction below the best, never above it."""
    sc = Scenario(MODELS["opt-13b"], profile, H200_CLUSTER, TASKS["C1"], 4)
    best = exhaustive(sc, 1.0, SEARCH, TINY).best.figures.throughput_seq_s
    for eps in (0.0, 0.02, 0.1):
        got = branch_and_bound(sc, 1.0, SEARCH, TINY, Tolerances(eps_t=eps)).best.figures.throughput_seq_s
        assert best * (1 - eps) - 1e-9 <= got <= best + 1e-9


SEARCH = ("rra", "waa-c", "waa-m")


@pytest.mark.parametrize("model, devices, task", [("opt-13b", 4, "G"), ("opt-1.3b", 2, "C2"), ("t5-11b", 4, "T")])
@pytest.mark.parametrize("policy", ["rra", "static", "continuous"])
def test_interval_bounds_hold_for_every_batch_inside(profile, model, devices, task, policy):
    """``Family.bounds`` over lo..hi: throughput at most, latency, peak and memory at least, what
    every batch of the interval gives."""
    sc = Scenario(MODELS[model], profile, H200_CLUSTER, TASKS[task], devices)
    rng = np.random.default_rng(7)
    for fam in families(sc, (policy,), TINY):
        rows = np.arange(fam.size)
        lo = rng.integers(1, fam.max_batch + 1, fam.size)
        hi = np.minimum(lo + rng.integers(0, fam.max_batch, fam.size), fam.max_batch)
        opt = fam.bounds(lo, hi, rows, fam.run(lo, rows))
        batches = np.arange(1, fam.max_batch + 1)
        p = fam.run(np.broadcast_to(batches, (fam.size, fam.max_batch)), rows)
        inside = (batches[None, :] >= lo[:, None]) & (batches[None, :] <= hi[:, None])
        top = np.where(inside, p.throughput_seq_s, -np.inf).max(axis=1)
        assert np.all(opt.throughput_seq_s >= top * (1 - 1e-12))
        for field in ("latency_p99_s", "decode_batch_peak", "memory_per_device_bytes"):
            least = np.where(inside, getattr(p, field), np.inf).min(axis=1)
            assert np.all(getattr(opt, field) <= least * (1 + 1e-12)), field
        assert not np.any(~opt.feasible & np.where(inside, p.feasible, False).any(axis=1))


@pytest.mark.parametrize("model, devices, task", [("opt-13b", 4, "S"), ("gpt3-175b", 16, "C1"), ("t5-11b", 4, "G")])
def test_waa_lines_are_monotone_in_the_decode_cap(profile, model, devices, task):
    """What makes bisection exact on WAA: along a line, throughput, latency and memory never fall
    as the cap grows, and feasibility is a prefix."""
    sc = Scenario(MODELS[model], profile, H200_CLUSTER, TASKS[task], devices)
    for fam in families(sc, ("waa-c",)):
        assert fam.kind == "monotone"
        caps = np.arange(1, fam.max_batch + 1)
        p = fam.run(np.broadcast_to(caps, (fam.size, fam.max_batch)), np.arange(fam.size))
        for field in ("throughput_seq_s", "latency_p99_s", "memory_per_device_bytes"):
            values = np.minimum(getattr(p, field), 1e300)  # a line that cannot fit stays at inf
            assert np.all(np.diff(values, axis=1) >= -1e-9 * np.abs(values[:, 1:])), field
        assert np.all(np.diff(p.feasible.astype(int), axis=1) <= 0)


# --- WAA's split is searched ------------------------------------------------------------------


def test_waa_searches_every_split_in_whole_tp_groups(profile):
    """The paper's layouts (every stage of both groups at degree k, one pipeline per role): every
    split in whole TP groups whose two groups can each hold GPT-3's weights (3 devices or more)."""
    sc = Scenario(MODELS["gpt3-175b"], profile, H200_CLUSTER, TASKS["S"], 16)
    fams = families(sc, ("waa-c", "waa-m"), SearchSpace(replicas=False, partial_waa_tp=False))
    splits = {}
    for fam in fams:
        row = 0
        s = fam.candidate(row, 1, fam.run(np.array([1]), np.array([row])).at(0)).schedule
        splits.setdefault(s.tp_degree, []).append(s.encoder_devices)
        assert s.encoder_devices + s.decoder_devices == 16 and s.encoder_devices % s.tp_degree == 0
        assert s.encoder_tp_stages == -1 and s.worker_devices == 0
    assert {k: sorted(v) for k, v in splits.items()} == {
        k: [e for e in range(k, 16, k) if min(e, 16 - e) >= 3] for k in (1, 2, 4, 8)
    }


def test_waa_families_cover_partial_tp_in_each_group_and_replicas(profile):
    sc = Scenario(MODELS["gpt3-175b"], profile, H200_CLUSTER, TASKS["S"], 16)
    shapes = set()
    for fam in families(sc, ("waa-c",)):
        s = fam.candidate(0, 1, fam.run(np.array([1]), np.array([0])).at(0)).schedule
        shapes.add((s.tp_degree, s.encoder_devices, s.encoder_tp_stages, s.tp_stages, s.worker_devices))
    # TP2, 10 encoders / 6 decoders: no TP in the encoders, TP on 0..3 decoder stages
    assert {(2, 10, 0, sd, 0) for sd in (1, 2, 3)} <= shapes
    assert (2, 10, 5, 0, 0) in shapes and (2, 10, -1, 8, 0) in shapes  # TP only in the encoders; everywhere
    assert any(w == 8 for *_, w in shapes) and any(w == 4 for *_, w in shapes)  # workers of 8 and of 4


def test_gpt3_on_16_devices_task_s_gets_the_split_it_needs(profile):
    """The split the old reference-point rule fixed (TP4 12/4, 47.8 seq/s) is far from the best
    (TP2 10/6)."""
    sc = Scenario(MODELS["gpt3-175b"], profile, H200_CLUSTER, TASKS["S"], 16)
    best = branch_and_bound(sc, math.inf).best
    assert best.figures.throughput_seq_s >= 68.0
    s = best.schedule
    assert s.policy in ("waa-c", "waa-m") and (s.tp_degree, s.encoder_devices, s.decoder_devices) == (2, 10, 6)


def test_waa_c_and_waa_m_name_the_rule_the_split_is_nearer(profile):
    from optimizer.analytic import WorkloadStats
    from optimizer.search import waa_label, waa_shares

    sc = Scenario(MODELS["opt-13b"], profile, H200_CLUSTER, TASKS["S"], 4)
    stats = WorkloadStats(sc.workload)
    compute, memory = waa_shares(sc, stats, 4, 100)
    assert 0 < compute < 1 and 0 < memory < 1
    near_c = min((1, 2, 3), key=lambda e: abs(e / 4 - compute))
    assert waa_label(sc, stats, ("waa-c", "waa-m"), near_c, 4, 100) == (
        "waa-c" if abs(near_c / 4 - compute) <= abs(near_c / 4 - memory) else "waa-m"
    )
    assert waa_label(sc, stats, ("waa-m",), near_c, 4, 100) == "waa-m"


# --- memory is checked on the whole decode batch a worker enforces ----------------------------


@pytest.mark.parametrize("policies", [("waa-c", "waa-m"), ("rra",), ("rra", "waa-c", "waa-m")])
def test_the_integer_decode_batch_fits_in_memory(profile, policies):
    """OPT-13B, task G, no bound: the pick sits at the memory limit; the decode batch it enforces
    (its predicted peak rounded up) must fit, as the simulator counts it."""
    from optimizer.analytic import WorkloadStats
    from optimizer.simulator import worker_layouts
    from optimizer.timing import memory_per_device

    sc = Scenario(MODELS["opt-13b"], profile, H200_CLUSTER, TASKS["G"], 4)
    best = branch_and_bound(sc, math.inf, policies).best
    s = best.schedule
    layout = worker_layouts(sc, s)[-1]
    used = float(memory_per_device(layout, sc.model, s.decode_batch, WorkloadStats(sc.workload).slot_tokens))
    assert used <= sc.cluster.usable_memory_bytes
    assert best.figures.memory_per_device_bytes <= sc.cluster.usable_memory_bytes
    assert s.decode_batch >= best.figures.decode_batch_peak
