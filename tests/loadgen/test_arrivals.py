import numpy as np
import pytest

from loadgen.arrivals import constant_arrivals, gamma_arrivals, poisson_arrivals, trace_arrivals


def _gaps(offsets: np.ndarray) -> np.ndarray:
    return np.diff(offsets)


def test_poisson_mean_rate_and_unit_dispersion():
    offsets = poisson_arrivals(8.0, 20_001, np.random.default_rng(1))
    gaps = _gaps(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    assert 1 / gaps.mean() == pytest.approx(8.0, rel=0.03)
    cv2 = gaps.var() / gaps.mean() ** 2  # exponential gaps: squared CV of 1
    assert cv2 == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 4.0])
def test_gamma_keeps_rate_and_sets_dispersion(burstiness):
    offsets = gamma_arrivals(5.0, burstiness, 40_001, np.random.default_rng(2))
    gaps = _gaps(offsets)
    assert 1 / gaps.mean() == pytest.approx(5.0, rel=0.04)
    assert gaps.var() / gaps.mean() ** 2 == pytest.approx(1 / burstiness, rel=0.1)


def test_burstier_process_has_more_variable_counts_per_window():
    rng = np.random.default_rng(3)
    bursty = np.histogram(gamma_arrivals(10, 0.2, 20_000, rng), bins=np.arange(0, 1900, 1.0))[0]
    smooth = np.histogram(gamma_arrivals(10, 5.0, 20_000, rng), bins=np.arange(0, 1900, 1.0))[0]
    # index of dispersion of counts: about 1/shape for a gamma renewal process
    assert bursty.var() / bursty.mean() > 3.0
    assert smooth.var() / smooth.mean() < 0.5


def test_same_seed_gives_gaps_proportional_to_one_over_rate():
    slow = gamma_arrivals(2.0, 0.5, 100, np.random.default_rng(7))
    fast = gamma_arrivals(8.0, 0.5, 100, np.random.default_rng(7))
    np.testing.assert_allclose(slow, fast * 4.0)


def test_constant_is_evenly_spaced():
    np.testing.assert_allclose(constant_arrivals(4.0, 5), [0, 0.25, 0.5, 0.75, 1.0])


def test_trace_is_shifted_and_compressed():
    np.testing.assert_allclose(trace_arrivals(np.array([10.0, 12.0, 20.0]), 2.0), [0, 1, 5])


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_rate_is_refused(bad):
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(bad, 3, np.random.default_rng(0))


def test_bad_burstiness_and_time_scale_are_refused():
    with pytest.raises(ValueError, match="burstiness"):
        gamma_arrivals(1.0, 0.0, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="time_scale"):
        trace_arrivals(np.array([0.0]), 0.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        trace_arrivals(np.array([1.0, 0.0]), 1.0)
