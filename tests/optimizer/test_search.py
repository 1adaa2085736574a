import math

import numpy as np
import pytest

from optimizer.analytic import Scenario
from optimizer.cluster import H200_CLUSTER
from optimizer.lengths import TASKS
from optimizer.model import MODELS
from optimizer.search import (SearchSpace, Tolerances, branch_and_bound, exhaustive, families, least_latency,
                              tp_configs)

SMALL = SearchSpace(max_encode_batch=48, waa_max_encode_batch=24, static_max_batch=64, continuous_max_batch=96,
                    iters_per_encode=(1, 2, 4, 7, 16), decode_caps=(8, 32, 128, 512, 2048),
                    microbatches=(1, 2))


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


@pytest.mark.parametrize("build", [
    lambda sc: branch_and_bound(sc, 1.0, ("fcfs",)),
    lambda sc: SearchSpace(max_encode_batch=0),
    lambda sc: Tolerances(eps_t=-1),
])
def test_bad_search_inputs_rejected(opt13b_s, build):
    with pytest.raises(ValueError):
        build(opt13b_s)


@pytest.mark.parametrize("policy", ["static", "rra", "continuous"])
def test_bound_just_above_the_fastest_schedule_is_found(opt13b_s, policy):
    """Where latency is nearly flat in the batch, the answer sits right above batch 1."""
    floor = min(float(f.run(np.ones(f.size, dtype=int), np.arange(f.size)).latency_p99_s.min())
                for f in families(opt13b_s, (policy,), SMALL))
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
