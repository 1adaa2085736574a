"""`exegpt bench optimizer`: a row with the arrival-rate comparison, and its one-line errors."""

import math

from optimizer.analytic import Scenario
from optimizer.cluster import H200_CLUSTER
from optimizer.lengths import TASKS
from optimizer.model import MODELS
from services.bench import optimizer as bench
from services.cli import main


def test_a_sustained_row_rates_both_checked_picks_below_their_saturated_throughput(profile, capsys):
    sc = Scenario(MODELS["opt-13b"], profile, H200_CLUSTER, TASKS["S"], 4)
    label, bound = bench.static_bounds(sc)[0]
    row = bench.bench_row(sc, "S", label, bound, with_exhaustive=False, verify=True, with_sustained=True)
    for rate, saturated in (
        (row.paper_sustained, row.best_paper_policy_throughput),
        (row.continuous_sustained, row.continuous_throughput),
    ):
        assert 0 < rate < saturated  # requests wait for their turn: the bound holds below saturation
    bench.print_sustained([row])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("opt-13b"))
    assert line.split()[-1] == f"{row.paper_sustained / row.continuous_sustained:.2f}"
    plain = bench.bench_row(sc, "S", label, bound, with_exhaustive=False, verify=True)
    assert math.isnan(plain.paper_sustained) and plain.throughput == row.throughput


def test_sustained_needs_the_simulator_checks(capsys):
    assert main(["bench", "optimizer", "--sustained", "--no-verify"]) == 2
    assert "--no-verify" in capsys.readouterr().err


def test_the_traffic_timings_time_one_search_both_ways_per_forecast(capsys):
    """Each forecast gets a row with both timings and their ratio; the two ways must pick alike
    (the bench stops otherwise)."""
    import re

    import pytest

    assert main(["bench", "optimizer", "--traffic", "--repeats", "1"]) == 0
    rows = [x for x in capsys.readouterr().out.splitlines() if "/s (" in x]
    assert len(rows) == len(bench.TRAFFIC_CASES)
    for row in rows:
        shared, afresh = (float(t) for t in re.findall(r"(\d+\.\d+) \[[^\]]*\] s", row))
        assert shared > 0 and afresh > 0
        assert float(row.split()[-1].rstrip("x")) == pytest.approx(afresh / shared, rel=0.1, abs=0.05)
