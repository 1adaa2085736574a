"""The enlarged search space: each new dimension's properties, the bounds the search prunes with,
and both searches against a brute-force enumerator that shares no code with the search."""

import math

import numpy as np
import pytest

from optimizer import analytic
from optimizer.analytic import Scenario, WorkloadStats
from optimizer.cluster import H200_CLUSTER
from optimizer.lengths import TASKS
from optimizer.model import MODELS
from optimizer.search import (
    PRODUCT_POLICIES,
    SearchSpace,
    branch_and_bound,
    exhaustive,
    families,
    replica_spans,
    space_size,
)
from optimizer.simulator import requests_from_workload, simulate
from tests.optimizer import bruteforce

TINY = SearchSpace(
    max_encode_batch=12,
    waa_max_encode_batch=6,
    static_max_batch=16,
    continuous_max_batch=24,
    iters_per_encode=(1, 3, 8),
    decode_caps=(2, 8, 32, 128, 512),
    microbatches=(1, 2),
    encode_microbatches=(1, 2),
    mixed_max_batch=24,
    chunk_tokens=(16, 64, 256),
)


def _sc(profile, model, devices, task):
    return Scenario(MODELS[model], profile, H200_CLUSTER, TASKS[task], devices)


# --- micro-batched encode ----------------------------------------------------------------------


def test_micro_batched_encode_fills_the_pipeline_once_and_never_falls_with_the_batch(profile):
    sc = _sc(profile, "opt-13b", 4, "S")
    stats = WorkloadStats(sc.workload)
    timer = sc.timer(sc.layout(4, 1, 0))
    b = np.arange(1, 257, dtype=float)
    whole = timer.encode_s(stats.prefill(b), 1)
    assert np.allclose(whole, timer.path_s(stats.prefill(b)))
    for m in (2, 4, 8, 16):
        t = timer.encode_s(stats.prefill(b), m)
        assert np.all(np.diff(t) >= -1e-12)  # monotone: the interval bounds rely on it
        assert np.all(t >= timer.bottleneck_s(stats.prefill(b)) - 1e-12)
        big = b >= 64
        assert np.all(t[big] < whole[big])  # a deep pipeline encodes a large batch faster in pieces
    one = timer.encode_s(stats.prefill(np.array([1.0])), 8)
    assert one == pytest.approx(whole[0])  # a single prompt is never split


@pytest.mark.parametrize("me", [1, 2, 4])
def test_rra_bounds_hold_over_every_interval_with_encode_micro_batches(profile, me):
    sc = _sc(profile, "opt-13b", 4, "T")
    stats = WorkloadStats(sc.workload)
    layout = sc.layout(4, 1, 0)
    rng = np.random.default_rng(1)
    for _ in range(20):
        lo = int(rng.integers(1, 200))
        hi = lo + int(rng.integers(0, 56))
        nd, m = int(rng.choice([1, 2, 7, 16])), int(rng.choice([1, 2, 4]))
        b = np.arange(lo, hi + 1, dtype=float)
        exact = analytic.rra(sc, stats, layout, b, nd, m, me)
        bound = analytic.rra_optimistic(sc, stats, layout, lo, hi, nd, m, me)
        assert np.max(exact.throughput_seq_s) <= bound.throughput_seq_s * (1 + 1e-9)
        assert np.min(exact.latency_p99_s) >= bound.latency_p99_s * (1 - 1e-9)
        assert np.min(exact.memory_per_device_bytes) >= bound.memory_per_device_bytes * (1 - 1e-9)


# --- layers by stage speed ----------------------------------------------------------------------


@pytest.mark.parametrize("devices, k, stages", [(4, 2, 1), (6, 2, 2), (16, 4, 2), (16, 8, 1)])
def test_layers_go_to_stages_by_speed(profile, devices, k, stages):
    sc = _sc(profile, "gpt3-175b", devices, "S")
    layout = sc.layout(devices, k, stages)
    cost = sc.layer_cost()
    layers = [s.decode_layers for s in layout.stages]
    assert sum(layers) == sc.model.layers and min(layers) >= 1
    slowest = max(n * cost[s.tp] for n, s in zip(layers, layout.stages))
    even = max(
        n * cost[s.tp]
        for n, s in zip(np.array_split(np.arange(sc.model.layers), len(layers)), layout.stages)
        for n in [len(n)]
    )
    assert slowest <= even + 1e-12
    # no single layer moved to another stage makes the slowest stage faster
    for i in range(len(layers)):
        for j in range(len(layers)):
            if i != j and layers[i] > 1:
                moved = list(layers)
                moved[i] -= 1
                moved[j] += 1
                assert max(n * cost[s.tp] for n, s in zip(moved, layout.stages)) >= slowest - 1e-12
    tp_layers = [s.decode_layers for s in layout.stages if s.tp == k]
    single = [s.decode_layers for s in layout.stages if s.tp == 1]
    if single:
        assert min(tp_layers) >= max(single)  # a TP stage is faster, so it holds at least as many


# --- honest continuous batching -----------------------------------------------------------------


def test_continuous_pays_the_prefill_stall_and_the_bubbles(profile):
    """On a 4-stage pipeline a prefill crosses every stage while the decode micro-batches wait:
    an iteration costs at least the decode iteration plus the prefill's share of a pass."""
    sc = _sc(profile, "opt-13b", 4, "S")
    stats = WorkloadStats(sc.workload)
    layout = sc.layout(4, 1, 0)
    timer = sc.timer(layout)
    b = np.array([8.0, 64.0, 256.0])
    for m in (1, 4):
        p = analytic.continuous(sc, stats, layout, b, m)
        new = b / stats.mean_out
        dec = timer.iteration_s(stats.decode(b - new, model=sc.model), m)
        t_it = b / (stats.mean_out * p.throughput_seq_s)
        assert np.all(t_it > dec)
        spread = timer.iteration_s(
            analytic.StepShape(new, new * stats.mean_in, stats.eff_in, b - new, stats.mean_ctx), m
        )
        assert np.all(t_it >= spread * (1 - 1e-9))  # never cheaper than the old even spread


def test_continuous_is_a_cost_family(profile):
    """Latency and memory never fall and batch / throughput never falls with the batch: what the
    interval bound of a ``cost`` family rests on."""
    sc = _sc(profile, "gpt3-175b", 16, "C1")
    stats = WorkloadStats(sc.workload)
    for k, s in ((1, 0), (4, 2), (8, 2)):
        layout = sc.layout(16, k, s)
        b = np.arange(1, 1025, dtype=float)
        for m in (1, 4):
            p = analytic.continuous(sc, stats, layout, b, m)
            assert np.all(np.diff(p.latency_p99_s) >= -1e-12)
            assert np.all(np.diff(b / p.throughput_seq_s) >= -1e-12)
            assert np.all(np.diff(p.memory_per_device_bytes) >= -1e-9)


@pytest.mark.parametrize("model, devices, task", [("opt-13b", 4, "S"), ("opt-1.3b", 2, "C2")])
def test_mixed_is_a_cost_family_with_a_true_ceiling(profile, model, devices, task):
    """Latency, memory and batch / throughput never fall with the batch at any token budget (the
    ``cost`` family's interval bound), and no schedule beats the family's ceiling or floor."""
    sc = _sc(profile, model, devices, task)
    fams = families(sc, ("mixed",))
    assert fams and all(f.lines["m"].tolist() == [1] * f.size for f in fams)
    for fam in fams:
        rows = np.arange(fam.size)
        b = np.broadcast_to(np.arange(1, fam.max_batch + 1), (fam.size, fam.max_batch))
        p = fam.run(b, rows)
        lat = np.where(np.isfinite(p.latency_p99_s), p.latency_p99_s, 1e300)
        assert np.all(np.diff(lat, axis=1) >= -1e-12)
        assert np.all(np.diff(b / p.throughput_seq_s, axis=1) >= -1e-12)
        assert np.all(np.diff(p.memory_per_device_bytes, axis=1) >= -1e-9)
        assert not np.any(p.feasible & (b >= fam.lines["c"][:, None]))  # B < C: room for prefill
        thr, floor = fam.ceiling()
        assert np.max(np.where(p.feasible, p.throughput_seq_s, 0.0)) <= thr * (1 + 1e-9)
        assert np.min(p.latency_p99_s) >= floor * (1 - 1e-9)


def test_mixed_runs_on_one_device_workers_of_decoder_only_models(profile):
    spans = {
        f.schedule(8, None, **{k: int(v[0]) for k, v in f.lines.items()}).worker_devices
        for f in families(_sc(profile, "opt-13b", 4, "S"), ("mixed",))
    }
    assert spans == {1}
    assert families(_sc(profile, "t5-11b", 8, "C1"), ("mixed",)) == []


def test_mixed_runs_as_predicted(profile):
    """The analytic figures of a mixed schedule agree with the simulator's run of MixedPolicy."""
    sc = _sc(profile, "opt-13b", 4, "S")
    best = branch_and_bound(sc, math.inf, ("mixed",)).best
    assert best.schedule.policy == "mixed" and best.schedule.chunk_tokens > best.schedule.decode_batch
    reqs = requests_from_workload(sc, np.random.default_rng(0), 2000)
    res = simulate(sc, best.schedule, reqs, closed_loop=4 * best.schedule.decode_batch)
    assert res.throughput_seq_s == pytest.approx(best.figures.throughput_seq_s, rel=0.10)
    assert res.latency_p99_len_s == pytest.approx(best.figures.latency_p99_s, rel=0.15)


# --- WAA ceilings and partial TP ----------------------------------------------------------------


@pytest.mark.parametrize("model, devices, task", [("opt-13b", 4, "S"), ("opt-66b", 8, "C2")])
def test_waa_family_ceilings_are_true_bounds(profile, model, devices, task):
    sc = _sc(profile, model, devices, task)
    for fam in families(sc, ("waa-c",), TINY):
        thr, floor = fam.ceiling()
        rows = np.arange(fam.size)
        caps = np.broadcast_to(np.arange(1, fam.max_batch + 1), (fam.size, fam.max_batch))
        p = fam.run(caps, rows)
        assert np.max(p.throughput_seq_s) <= thr * (1 + 1e-9)
        assert np.min(p.latency_p99_s) >= floor * (1 - 1e-9)


@pytest.mark.parametrize("model, devices, task", [("opt-13b", 4, "S"), ("t5-11b", 8, "C1")])
def test_rra_and_continuous_family_ceilings_are_true_bounds(profile, model, devices, task):
    sc = _sc(profile, model, devices, task)
    for fam in families(sc, ("rra", "continuous"), TINY):
        thr, floor = fam.ceiling()
        rows = np.arange(fam.size)
        batches = np.broadcast_to(np.arange(1, fam.max_batch + 1), (fam.size, fam.max_batch))
        p = fam.run(batches, rows)
        fits = p.feasible
        assert np.max(np.where(fits, p.throughput_seq_s, 0.0)) <= thr * (1 + 1e-9)
        assert np.min(p.latency_p99_s) >= floor * (1 - 1e-9)


def _point(fam, want, batch):
    """The family's first line whose schedule satisfies ``want``, at ``batch``: (candidate)."""
    for row in range(fam.size):
        p = fam.run(np.array([batch]), np.array([row])).at(0)
        cand = fam.candidate(row, batch, p)
        if want(cand.schedule) and bool(p.feasible):
            return cand
    return None


def test_partial_tp_waa_and_micro_batched_rra_run_as_predicted(profile):
    sc = _sc(profile, "opt-13b", 4, "S")
    space = SearchSpace(replicas=False)
    partial = lambda s: s.tp_degree == 2 and s.encoder_tp_stages == 0 and s.tp_stages == 1  # noqa: E731
    waa = next(c for f in families(sc, ("waa-c",), space) if (c := _point(f, partial, 12)) is not None)
    split_encode = lambda s: s.encode_microbatches == 4 and s.tp_degree == 1 and s.decode_iters_per_encode == 8  # noqa: E731
    rra = next(c for f in families(sc, ("rra",), space) if (c := _point(f, split_encode, 64)) is not None)
    for cand in (waa, rra):
        s = cand.schedule
        slots = cand.figures.decode_batch_peak * max(s.decoder_workers, 1)
        sim = simulate(sc, s, requests_from_workload(sc, np.random.default_rng(0), int(min(max(600, 7 * slots), 4000))))
        assert sim.throughput_seq_s == pytest.approx(cand.figures.throughput_seq_s, rel=0.15), s
        assert sim.fits_memory


def test_replicas_are_whole_pipelines_that_hold_the_weights(profile):
    assert replica_spans(_sc(profile, "gpt3-175b", 16, "S"), SearchSpace()) == [0, 4, 8]
    assert replica_spans(_sc(profile, "opt-13b", 4, "S"), SearchSpace()) == [0, 1, 2]
    assert replica_spans(_sc(profile, "opt-13b", 4, "S"), SearchSpace(replicas=False)) == [0]
    sc = _sc(profile, "opt-13b", 4, "S")
    stats = WorkloadStats(sc.workload)
    one = analytic.continuous(sc, stats, sc.layout(1, 1, 0), np.array([32.0]), 1)
    four = analytic.replicated(one, 4)
    assert four.throughput_seq_s == pytest.approx(4 * one.throughput_seq_s)
    assert four.latency_p99_s == one.latency_p99_s


def test_the_space_size_is_what_the_exhaustive_search_evaluates(profile):
    sc = _sc(profile, "opt-13b", 4, "S")
    assert space_size(sc, PRODUCT_POLICIES, TINY) == exhaustive(sc, math.inf, PRODUCT_POLICIES, TINY).evaluations


# --- both searches against the brute-force enumerator -------------------------------------------


@pytest.mark.parametrize("model, devices, task", [("opt-1.3b", 2, "S"), ("opt-13b", 4, "C1")])
@pytest.mark.parametrize("bound_s", [0.3, 1.0, 4.0, math.inf])
def test_branch_and_bound_and_exhaustive_match_brute_force(profile, model, devices, task, bound_s):
    sc = _sc(profile, model, devices, task)
    brute = bruteforce.best_throughput(sc, bound_s, PRODUCT_POLICIES, TINY)
    bb = branch_and_bound(sc, bound_s, PRODUCT_POLICIES, TINY).best
    ex = exhaustive(sc, bound_s, PRODUCT_POLICIES, TINY).best
    got_bb = bb.figures.throughput_seq_s if bb else 0.0
    got_ex = ex.figures.throughput_seq_s if ex else 0.0
    assert got_ex == pytest.approx(brute, rel=1e-9)
    assert got_bb == pytest.approx(brute, rel=1e-9)


@pytest.mark.parametrize("bound_s", [0.5, 2.0, math.inf])
def test_product_is_never_below_a_baseline_or_the_paper_policies(profile, bound_s):
    sc = _sc(profile, "opt-13b", 4, "G")
    thr = {}
    for name, pols in (
        ("product", PRODUCT_POLICIES),
        ("paper", ("rra", "waa-c", "waa-m")),
        ("static", ("static",)),
        ("continuous", ("continuous",)),
    ):
        r = branch_and_bound(sc, bound_s, pols)
        thr[name] = r.best.figures.throughput_seq_s if r.best else 0.0
    assert thr["product"] >= max(thr["paper"], thr["static"], thr["continuous"]) * (1 - 1e-12)
