"""Properties of the steady-state model over the whole search space."""

import numpy as np
import pytest

from optimizer.analytic import Scenario, WorkloadStats
from optimizer.cluster import H200_CLUSTER
from optimizer.lengths import TASKS
from optimizer.model import MODELS
from optimizer.search import families

ALL = ("rra", "waa-c", "waa-m", "static", "continuous")
# Stated tolerances (docs/optimizer.md): along any line of the search space, latency never drops
# by more than 3 % as the batch grows, throughput never by more than 10 % (measured layer times
# are not convex everywhere: per-token cost of the MLP rises between 1k and 4k tokens).
LATENCY_MONOTONE_TOL = 0.03
THROUGHPUT_MONOTONE_TOL = 0.10


def _everything(sc):
    out = []
    for fam in families(sc, ALL):
        rows = np.arange(fam.size)
        batch = np.broadcast_to(np.arange(1, fam.max_batch + 1), (fam.size, fam.max_batch))
        out.append((fam, fam.run(batch, rows)))
    return out


def _roofline_seq_s(sc: Scenario) -> float:
    """Every prompt and output token passes every layer's non-attention part; at best a device
    does that at the profile's best measured time per token (over all TP degrees, counting the k
    devices of a TP group)."""
    best = min(
        k * curve.ys[i] / curve.xs[i]
        for k in sc.tp_degrees()
        for curve in [sc.profile.layer_times(sc.model.name, k).rest]
        for i in range(len(curve.xs))
    )
    stats = WorkloadStats(sc.workload)
    tokens = stats.mean_in + stats.mean_decode_iters
    return sc.devices / (sc.model.layers * tokens * best * 1e-3)


@pytest.fixture(scope="module", params=[("opt-13b", 4, "S"), ("opt-13b", 4, "G"), ("gpt3-175b", 16, "C1")])
def scenario(request, profile):
    model, n, task = request.param
    sc = Scenario(MODELS[model], profile, H200_CLUSTER, TASKS[task], n)
    return sc, _everything(sc)


def test_throughput_never_exceeds_the_profile_roofline(scenario):
    sc, evaluated = scenario
    roof = _roofline_seq_s(sc)
    best = max(float(np.max(np.where(p.feasible, p.throughput_seq_s, 0))) for _, p in evaluated)
    assert 0 < best <= roof


def test_latency_and_throughput_grow_with_batch_within_tolerance(scenario):
    for fam, p in scenario[1]:
        lat = p.latency_p99_s
        assert np.all(lat >= np.maximum.accumulate(lat, axis=1) * (1 - LATENCY_MONOTONE_TOL)), fam.policy
        thr = np.where(p.feasible, p.throughput_seq_s, np.nan)
        peak = np.fmax.accumulate(np.nan_to_num(thr), axis=1)
        ok = np.isnan(thr) | (thr >= peak * (1 - THROUGHPUT_MONOTONE_TOL))
        assert np.all(ok), fam.policy


def test_predictions_are_finite_and_positive(scenario):
    sc, evaluated = scenario
    for fam, p in evaluated:
        f = p.feasible
        assert np.all(np.isfinite(p.latency_p99_s[f])) and np.all(p.throughput_seq_s[f] > 0), fam.policy
        assert np.allclose(p.throughput_tok_s, p.throughput_seq_s * sc.workload.output.mean)
        assert np.all(p.memory_per_device_bytes[f] <= H200_CLUSTER.usable_memory_bytes)


def test_unprofiled_model_or_no_devices_rejected(profile):
    with pytest.raises(ValueError, match="no rows for model"):
        Scenario(MODELS["gpt3-39b"], profile, H200_CLUSTER, TASKS["S"], 4)
    with pytest.raises(ValueError):
        Scenario(MODELS["opt-13b"], profile, H200_CLUSTER, TASKS["S"], 0)


def test_functions_of_repeated_arguments_are_evaluated_once_per_combination():
    from optimizer.analytic import _on_unique

    rng = np.random.default_rng(1)
    a = rng.integers(1, 40, size=(50, 30)).astype(float)
    b = rng.choice([1.0, 2.0, 4.0], size=(1, 30))
    seen = []

    def fn(x, y):
        seen.append(len(x))
        return x * 1000 + y**0.5

    out = _on_unique(fn, a, b)
    assert out.shape == (50, 30) and np.array_equal(out, a * 1000 + b**0.5)
    combos = {(x, y) for x, y in zip(*(v.ravel() for v in np.broadcast_arrays(a, b)))}
    assert seen == [len(combos)]


def test_the_longest_decode_reads_the_expected_maximum_of_the_batch(opt13b_s):
    from optimizer.analytic import _longest_decode

    batches = np.array([1.0, 2.0, 3.5, 17.0, 100.0])
    exact = opt13b_s.workload.output.expected_max(batches) - 1
    assert _longest_decode(opt13b_s, batches)[[0, 1, 3, 4]] == pytest.approx(exact[[0, 1, 3, 4]], rel=1e-12)
    assert exact[1] < _longest_decode(opt13b_s, batches)[2] < exact[3]
    alone, beside_a_big_one = (
        _longest_decode(opt13b_s, np.array([5.0])),
        _longest_decode(opt13b_s, np.array([5.0, 300.0])),
    )
    assert alone[0] == pytest.approx(beside_a_big_one[0], rel=1e-12)  # whatever table size was built
