"""SLOs as users state them: a request meets the SLO when every bound in force holds for it."""

import math
from dataclasses import dataclass

import pytest

from optimizer.slo import Slo, figures, meets


@dataclass(frozen=True)
class R:
    arrival_s: float
    first_token_s: float
    finish_s: float
    output_len: int


def test_each_bound_alone_and_together():
    quick = R(0.0, 0.2, 1.2, 11)  # TTFT 0.2 s, TPOT 100 ms, end to end 1.2 s
    assert meets(quick, Slo(ttft_s=0.5)) and not meets(quick, Slo(ttft_s=0.1))
    assert meets(quick, Slo(tpot_s=0.1)) and not meets(quick, Slo(tpot_s=0.05))
    assert meets(quick, Slo(e2e_s=1.5)) and not meets(quick, Slo(e2e_s=1.0))
    assert not meets(quick, Slo(ttft_s=0.5, tpot_s=0.05))
    assert meets(R(0.0, 0.2, 0.2, 1), Slo(tpot_s=1e-6))  # one token: no time per output token


def test_attainment_percentiles_and_whether_the_slo_holds():
    rows = [R(0.0, 0.1, 1.1, 11)] * 98 + [R(0.0, 2.0, 3.0, 11)] * 2
    f = figures(rows, Slo(ttft_s=0.5, ttft_percentile=0.95))
    assert f.attainment == pytest.approx(0.98)
    assert f.ttft_s == pytest.approx(0.1) and f.holds  # 98 % within, 95 % asked
    strict = figures(rows, Slo(ttft_s=0.5, ttft_percentile=0.99))
    assert not strict.holds and strict.ttft_s > 0.5 and strict.pressure > 1
    assert figures([], Slo(ttft_s=1)).attainment != figures([], Slo(ttft_s=1)).attainment  # NaN


def test_bad_slos_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="ttft_s"):
        Slo(ttft_s=0)
    with pytest.raises(ValueError, match="tpot_percentile"):
        Slo(tpot_s=0.1, tpot_percentile=1.0)
    with pytest.raises(ValueError, match="e2e_s"):
        Slo(e2e_s=math.nan)


def test_target_and_description():
    assert Slo().target == 0.99 and not Slo().bounded
    assert Slo(ttft_s=1, ttft_percentile=0.9).target == 0.9
    assert Slo(ttft_s=1, ttft_percentile=0.9, tpot_s=0.1, tpot_percentile=0.95).target == 0.95
    assert Slo(ttft_s=1.5, tpot_s=0.08).describe() == "TTFT p99 <= 1.5 s, TPOT p99 <= 80 ms"
