"""Prometheus metrics of one gateway, in its own registry (several apps may share a process).

Besides the gateway's own counters, each scrape exports what the scheduler decided: the records
``observe_schedule`` is given (the current ScheduleUpdate and the SchedulerState, read from the
store by the /metrics route) become the ``exegpt_schedule_*``, ``exegpt_length_quantile``,
``exegpt_arrival_*`` and ``exegpt_scheduler_workers`` gauges; a record that is absent leaves its
gauges out (not zeros).
"""

from __future__ import annotations

import math
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from common.lifecycle import Stage, Timeline
from common.messages.control import ScheduleUpdate
from common.messages.status import SchedulerState

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Phases of a request between two lifecycle stages, as exegpt_phase_seconds{phase}.
PHASES: dict[str, tuple[Stage, Stage]] = {
    "queue": (Stage.QUEUED, Stage.ENCODE_START),
    "encode": (Stage.ENCODE_START, Stage.ENCODE_END),
    "handoff": (Stage.HANDED_OFF, Stage.DECODE_START),
    "decode": (Stage.DECODE_START, Stage.FINISHED),
}


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("exegpt_requests", "HTTP generation requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("exegpt_requests_in_flight", "Requests submitted, not finished", registry=r)
        self.queue_depth = Gauge("exegpt_queue_depth", "Messages waiting in a work queue", ["queue"], registry=r)
        self.ttft = Histogram("exegpt_ttft_seconds", "Time to first token", buckets=LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram("exegpt_tpot_seconds", "Time per output token after the first",
                              buckets=TOKEN_BUCKETS_S, registry=r)
        self.e2e = Histogram("exegpt_e2e_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram("exegpt_batch_size", "Requests per worker iteration", ["role"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.output_tokens = Counter("exegpt_output_tokens", "Tokens returned to clients", registry=r)
        self.phase = Histogram("exegpt_phase_seconds", "Time a request spent in each phase",
                               ["phase"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.schedule = ScheduleGauges()
        r.register(self.schedule)

    def observe_schedule(self, update: ScheduleUpdate | None, state: SchedulerState | None) -> None:
        self.schedule.update, self.schedule.state = update, state

    def finished(self, timeline: Timeline) -> None:
        for histogram, value in ((self.ttft, timeline.ttft_s), (self.tpot, timeline.tpot_s),
                                 (self.e2e, timeline.e2e_s)):
            if value is not None:
                histogram.observe(value)
        self.output_tokens.inc(timeline.output_tokens)
        for phase, (start, end) in PHASES.items():
            seconds = timeline.between(start, end)
            if seconds is not None:
                self.phase.labels(phase).observe(max(seconds, 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


QUANTILES = ("0.5", "0.9", "0.99")  # SchedulerState's (p50, p90, p99)

# gauge -> (help, the SchedulerState field it reads)
STATE_GAUGES: dict[str, tuple[str, str]] = {
    "exegpt_schedule_pinned": ("1 when an operator pinned the schedule", "pinned"),
    "exegpt_schedule_latency_bound_seconds": ("Latency bound planned for (absent: none)", "latency_bound_s"),
    "exegpt_schedule_predicted_throughput": ("Throughput the plan predicts, sequences/s",
                                             "predicted_throughput_seq_s"),
    "exegpt_schedule_observed_throughput": ("Throughput observed under the schedule, sequences/s",
                                            "observed_throughput_seq_s"),
    "exegpt_schedule_predicted_latency_seconds": ("p99-length latency the plan predicts", "predicted_latency_s"),
    "exegpt_schedule_observed_latency_seconds": ("p99 end-to-end latency observed", "observed_latency_s"),
    "exegpt_schedule_drift_statistic": ("Two-sample drift test's statistic at the last check", "drift_statistic"),
    "exegpt_schedule_replans": ("Searches run since this scheduler took the lead", "replans"),
    "exegpt_arrival_rate": ("Arrival rate the statistics hold, requests/s", "arrival_rate_s"),
    "exegpt_arrival_cv": ("Coefficient of variation of inter-arrival gaps", "arrival_cv"),
    "exegpt_scheduler_workers": ("Live workers the allocation covers", "workers"),
}


class ScheduleGauges(Collector):
    """The scheduler's records as gauges, built at collection time from the latest ones given."""

    def __init__(self) -> None:
        self.update: ScheduleUpdate | None = None
        self.state: SchedulerState | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        update, state = self.update, self.state
        if update is not None:
            yield GaugeMetricFamily("exegpt_schedule_version", "Schedule version in force", value=update.version)
            info = GaugeMetricFamily("exegpt_schedule_info", "The schedule in force (1)", labels=["policy"])
            info.add_metric([update.schedule.policy], 1)
            yield info
        if state is not None:
            yield from self._state(state)

    def _state(self, state: SchedulerState) -> Iterator[GaugeMetricFamily]:
        for name, (text, field) in STATE_GAUGES.items():
            value = float(getattr(state, field))
            if math.isfinite(value):
                yield GaugeMetricFamily(name, text, value=value)
        yield GaugeMetricFamily("exegpt_schedule_infeasible", "1 when no schedule meets the latency "
                                "bound (the least-latency one runs): the alert", value=float(not state.meets_bound))
        lengths = GaugeMetricFamily("exegpt_length_quantile", "Length quantiles the plan is based on, tokens",
                                    labels=["kind", "quantile"])
        for kind, values in (("input", state.input_quantiles), ("output", state.output_quantiles)):
            for quantile, value in zip(QUANTILES, values):
                lengths.add_metric([kind, quantile], value)
        yield lengths

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # names vary with the records: collected at each scrape only
