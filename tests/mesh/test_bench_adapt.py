"""The adapt benchmark's own logic (a run takes minutes on SmolLM2: a benchmark)."""

import argparse
import math

import pytest

from services.bench.adapt import KEYS, SETTLE_S, WARMUP_S, Run, Sent, Setup, add_arguments, summarize, traffic


def args_for(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def setup(rate: float = 4.0) -> Setup:
    return Setup(profile=None, cluster=None, bound=2.0, rate=rate, first=None, scale=0.125)


@pytest.mark.parametrize("cv", [1.0, 3.0])
def test_traffic_is_task_s_then_task_t_at_the_rate(cv):
    args = args_for("--before-s", "40", "--after-s", "60", "--cv", str(cv))
    sent = traffic(args, setup(), seed=1)
    assert all((s.task == "S") == (s.at < 40) for s in sent) and max(s.at for s in sent) < 100
    assert len(sent) == pytest.approx(400, rel=0.35 if cv > 1 else 0.15)
    assert len({s.request_id for s in sent}) == len(sent)
    assert traffic(args, setup(), seed=1) == sent  # both runs of a pair see the same requests


def finished(request_id: str, task: str, at: float, latency: float | None, error: str = "") -> Sent:
    return Sent(request_id, task, at, 10, 10, at + latency if latency is not None else math.nan, error)


def test_summary_has_exactly_the_issue_keys_and_counts_lost_and_attainment():
    args = args_for("--before-s", "20", "--after-s", "30", "--pairs", "1")
    late = 20 + SETTLE_S
    adaptive = Run(
        "adaptive",
        0,
        20.0,
        [
            finished("a", "S", WARMUP_S + 1, 1.0),
            finished("b", "S", WARMUP_S + 2, 3.0),  # one over the 2 s bound
            finished("c", "T", late + 1, 1.0),
            finished("d", "T", late + 2, 1.5),
            finished("e", "T", late + 3, None),  # accepted, never answered: lost
            finished("f", "T", late + 4, None, error="timeout"),
        ],
    )  # failed, not lost
    adaptive.replanned_at_s, adaptive.requests_until_replan = 27.5, 9
    fixed = Run("fixed", 0, 20.0, [finished("a", "S", WARMUP_S + 1, 1.0), finished("c", "T", late + 1, 5.0)])
    fixed.duplicated = 1
    summary = summarize([adaptive, fixed], setup(), args)
    assert tuple(summary) == KEYS
    assert summary["lost"] == 1 and summary["duplicated"] == 1
    assert summary["replanned_at_s"] == 27.5 and summary["requests_until_replan"] == 9
    assert summary["attainment_before"] == pytest.approx(0.75)  # median of 0.5 (adaptive) and 1.0 (fixed)
    assert summary["attainment_after_adaptive"] == pytest.approx(2 / 4)
    assert summary["attainment_after_fixed"] == 0.0
    assert summary["throughput_after_adaptive"] == pytest.approx(2 / (50 - late))


def test_a_run_that_never_replanned_has_no_replan_time():
    args = args_for("--before-s", "20", "--after-s", "30", "--pairs", "1")
    run = Run("adaptive", 0, 20.0, [finished("a", "S", WARMUP_S + 1, 1.0)])
    assert summarize([run], setup(), args)["replanned_at_s"] is None
