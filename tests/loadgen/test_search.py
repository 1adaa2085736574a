import pytest

from loadgen.metrics import RequestRecord, Slo, summarize
from loadgen.search import find_max_rate, sweep


def summary_with_attainment(fraction: float):
    """Ten requests, ``fraction`` of them within a 100 ms E2E bound."""
    met = round(fraction * 10)
    records = [RequestRecord(i, 0.0, 0.05 if i < met else 0.5, 1, 1, (0.01,)) for i in range(10)]
    return summarize(records, Slo(e2e_ms=100))


def capacity_model(capacity):
    calls = []

    async def measure(rate):
        calls.append(rate)
        return summary_with_attainment(1.0 if rate <= capacity else 0.5)

    return measure, calls


async def test_bisection_converges_to_the_capacity():
    measure, calls = capacity_model(7.3)
    result = await find_max_rate(measure, 0.9, 1.0, 32.0, max_runs=20, rel_tolerance=0.01)
    assert result.max_rate_per_s is not None
    assert 7.3 * 0.99 <= result.max_rate_per_s <= 7.3
    assert calls[:2] == [32.0, 1.0] and len(result.points) == len(calls) <= 20


async def test_bisection_stops_at_max_runs():
    measure, calls = capacity_model(7.3)
    result = await find_max_rate(measure, 0.9, 1.0, 32.0, max_runs=5, rel_tolerance=0.0)
    assert len(calls) == 5 and result.max_rate_per_s <= 7.3


async def test_bisection_when_high_passes_or_low_fails():
    measure, _ = capacity_model(100.0)
    assert (await find_max_rate(measure, 0.9, 1.0, 32.0)).max_rate_per_s == 32.0
    measure, calls = capacity_model(0.5)
    result = await find_max_rate(measure, 0.9, 1.0, 32.0)
    assert result.max_rate_per_s is None and calls == [32.0, 1.0]


async def test_bisection_validates():
    measure, _ = capacity_model(1.0)
    with pytest.raises(ValueError):
        await find_max_rate(measure, 0.9, 4.0, 2.0)
    with pytest.raises(ValueError):
        await find_max_rate(measure, 1.5, 1.0, 2.0)


async def test_sweep_runs_each_rate_in_order():
    measure, calls = capacity_model(3.0)
    points = await sweep([1, 2, 4, 8], measure)
    assert calls == [1, 2, 4, 8]
    assert [p.attainment for p in points] == [1.0, 1.0, 0.5, 0.5]
