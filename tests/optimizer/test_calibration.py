"""The calibrated cost model: it learns a known slowdown from step records, follows a change of
speed, shrugs off outliers, and every timer of a calibrated scenario applies it."""

import math

import numpy as np
import pytest

from optimizer.analytic import Scenario
from optimizer.calibration import IDENTITY, Calibration, CalibrationTable, bucket_of, step_kind
from optimizer.cluster import H200_CLUSTER
from optimizer.lengths import TASKS
from optimizer.model import MODELS
from optimizer.profile import StepShape


def fake_steps(rng: np.random.Generator, n: int, slowdown, start: float = 0.0, every_s: float = 0.05):
    """``n`` steps of a fake engine: decode steps of 1-32 rows and prefills of 16-512 tokens,
    each taking the profile's time times ``slowdown(kind, tokens)`` times 5 % noise."""
    for i in range(n):
        if rng.random() < 0.7:
            kind, tokens = "decode", float(rng.integers(1, 33))
        else:
            kind, tokens = "prefill", float(rng.integers(16, 513))
        predicted = 1e-3 * (5 + 0.02 * tokens)
        measured = predicted * slowdown(kind, tokens) * rng.lognormal(0.0, 0.05)
        yield kind, tokens, measured, predicted, start + i * every_s


def test_a_known_slowdown_is_learned_to_within_two_percent_after_200_steps():
    cal = Calibration(half_life_s=60.0)
    rng = np.random.default_rng(1)
    for record in fake_steps(rng, 200, lambda kind, tokens: 1.3):
        cal.observe(*record)
    table = cal.table(now=10.0)
    for kind, tokens in (("decode", 1), ("decode", 8), ("decode", 32), ("prefill", 32), ("prefill", 400)):
        assert table.scalar(kind, tokens) == pytest.approx(1.3, rel=0.02), (kind, tokens)


def test_factors_differ_by_shape_not_one_global_factor():
    cal = Calibration()
    rng = np.random.default_rng(2)
    for record in fake_steps(rng, 400, lambda kind, tokens: 1.4 if kind == "decode" else 0.9):
        cal.observe(*record)
    table = cal.table(now=20.0)
    assert table.scalar("decode", 4) == pytest.approx(1.4, rel=0.03)
    assert table.scalar("prefill", 256) == pytest.approx(0.9, rel=0.03)


def test_a_change_of_speed_is_followed_within_a_ring_of_steps():
    cal = Calibration(half_life_s=20.0)
    rng = np.random.default_rng(3)
    steps = list(fake_steps(rng, 300, lambda kind, tokens: 1.3))
    later = list(fake_steps(rng, 300, lambda kind, tokens: 0.8, start=steps[-1][-1] + 0.05))
    for record in steps:
        cal.observe(*record)
    assert cal.table(steps[-1][-1]).scalar("decode", 16) == pytest.approx(1.3, rel=0.03)
    for record in later:
        cal.observe(*record)
    assert cal.table(later[-1][-1]).scalar("decode", 16) == pytest.approx(0.8, rel=0.03)


def test_a_tenth_of_steps_stalled_tenfold_barely_moves_the_factor():
    cal = Calibration()
    rng = np.random.default_rng(4)

    def slowdown(kind, tokens):
        return 10.0 if rng.random() < 0.1 else 1.2

    for record in fake_steps(rng, 300, slowdown):
        cal.observe(*record)
    assert cal.table(15.0).scalar("decode", 16) == pytest.approx(1.2, rel=0.04)


def test_broken_records_are_dropped_and_no_record_means_the_raw_profile():
    cal = Calibration()
    assert cal.table(0.0) == IDENTITY
    assert not cal.observe("decode", 4, 0.0, 1e-3, 0.0)
    assert not cal.observe("decode", 4, 1.0, 1e-3, 0.0)  # 1000x: not a real step
    assert not cal.observe("decode", 4, math.nan, 1e-3, 0.0)
    assert cal.dropped == 3 and cal.table(0.0) == IDENTITY
    with pytest.raises(ValueError, match="unknown step kind"):
        cal.observe("lunch", 4, 1e-3, 1e-3, 0.0)


def test_a_kind_without_samples_takes_the_median_of_the_others():
    cal = Calibration()
    for i in range(50):
        cal.observe("decode", 8, 1.5e-3, 1e-3, i * 0.1)
    table = cal.table(5.0)
    assert table.scalar("prefill", 128) == pytest.approx(1.5)
    assert table.scalar("mixed", 64) == pytest.approx(1.5)


def test_samples_older_than_a_few_half_lives_no_longer_count():
    cal = Calibration(half_life_s=10.0)
    for i in range(50):
        cal.observe("decode", 8, 2e-3, 1e-3, i * 0.1)
    assert cal.table(5.0).scalar("decode", 8) == pytest.approx(2.0)
    assert cal.table(500.0) == IDENTITY


def test_state_carried_to_another_process_gives_the_same_table():
    cal = Calibration(half_life_s=30.0)
    for record in fake_steps(np.random.default_rng(5), 120, lambda kind, tokens: 1.1 + tokens / 1000):
        cal.observe(*record)
    again = Calibration.from_plain(cal.to_plain())
    assert again.table(7.0) == cal.table(7.0)
    with pytest.raises(ValueError, match="not a calibration bucket"):
        Calibration.from_plain({"half_life_s": 1.0, "buckets": [["decode", 1, [0.1], []]]})


def test_the_factor_never_falls_steeply_with_step_size():
    cal = Calibration()
    for i in range(64):
        cal.observe("decode", 1, 2e-3, 1e-3, i * 0.01)
        cal.observe("decode", 1024, 1e-3, 1e-3, i * 0.01)
    table = cal.table(1.0)
    assert table.scalar("decode", 1024) >= table.scalar("decode", 1) * math.exp(-0.03 * 10) - 1e-9


def test_step_kinds_and_buckets():
    assert step_kind(2, 0) == "prefill" and step_kind(0, 3) == "decode" and step_kind(1, 3) == "mixed"
    assert bucket_of(0) == 0 and bucket_of(1) == 0 and bucket_of(31) == 4 and bucket_of(32) == 5


def test_a_calibrated_scenario_predicts_every_step_slower_by_its_factor(profile):
    raw = Scenario(MODELS["opt-13b"], profile, H200_CLUSTER, TASKS["S"], 1)
    table = CalibrationTable((("decode", _flat(1.25)), ("prefill", _flat(1.5)), ("mixed", _flat(2.0))))
    cal = Scenario(MODELS["opt-13b"], profile, H200_CLUSTER, TASKS["S"], 1, calibration=table)
    layout = raw.layout(1, 1, 0)
    t_raw, t_cal = raw.timer(layout), cal.timer(layout)
    dec = StepShape(decode_seqs=np.array([1.0, 16.0]), decode_ctx=300.0)
    pre = StepShape(prefill_seqs=4.0, prefill_tokens=1000.0, prefill_seq=250.0)
    both = StepShape(4.0, 1000.0, 250.0, 16.0, 300.0)
    np.testing.assert_allclose(t_cal.iteration_s(dec, 1), 1.25 * t_raw.iteration_s(dec, 1))
    np.testing.assert_allclose(t_cal.encode_s(pre), 1.5 * t_raw.encode_s(pre))
    np.testing.assert_allclose(t_cal.mixed_s(both, 1), 2.0 * t_raw.mixed_s(both, 1))


def _flat(factor: float):
    from optimizer.calibration import KindCurve

    return KindCurve((0.5,), (math.log(factor),))
