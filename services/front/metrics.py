"""Prometheus metrics of one gateway, in its own registry (several apps may share a process).

Besides the gateway's own counters, each scrape exports what the scheduler decided: the records
``observe_schedule`` is given (the current ScheduleUpdate and the SchedulerState, read from the
store by the /metrics route) become the ``exegpt_schedule_*``, ``exegpt_length_quantile``,
``exegpt_arrival_*`` and ``exegpt_scheduler_workers`` gauges; a record that is absent leaves its
gauges out (not zeros).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from common.lifecycle import Stage, Timeline
from common.messages.control import ScheduleUpdate
from common.messages.status import SchedulerState
from common.schedule_gauges import ScheduleGauges

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
        self.requests = Counter(
            "exegpt_requests", "HTTP generation requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.refused = Counter(
            "exegpt_refused",
            "Requests refused before any work was queued: 429 "
            "by the limit reached (in_flight, queue_depth, key_in_flight, key_tokens), "
            "503 as unavailable",
            ["reason"],
            registry=r,
        )
        self.in_flight = Gauge("exegpt_requests_in_flight", "Requests submitted, not finished", registry=r)
        self.queue_depth = Gauge("exegpt_queue_depth", "Messages waiting in a work queue", ["queue"], registry=r)
        self.ttft = Histogram("exegpt_ttft_seconds", "Time to first token", buckets=LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram(
            "exegpt_tpot_seconds", "Time per output token after the first", buckets=TOKEN_BUCKETS_S, registry=r
        )
        self.e2e = Histogram("exegpt_e2e_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram(
            "exegpt_batch_size", "Requests per worker iteration", ["role"], buckets=BATCH_BUCKETS, registry=r
        )
        self.output_tokens = Counter("exegpt_output_tokens", "Tokens returned to clients", registry=r)
        self.phase = Histogram(
            "exegpt_phase_seconds",
            "Time a request spent in each phase",
            ["phase"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.schedule = ScheduleGauges()
        r.register(self.schedule)

    def observe_schedule(self, update: ScheduleUpdate | None, state: SchedulerState | None) -> None:
        self.schedule.update, self.schedule.state = update, state

    def finished(self, timeline: Timeline) -> None:
        for histogram, value in (
            (self.ttft, timeline.ttft_s),
            (self.tpot, timeline.tpot_s),
            (self.e2e, timeline.e2e_s),
        ):
            if value is not None:
                histogram.observe(value)
        self.output_tokens.inc(timeline.output_tokens)
        for phase, (start, end) in PHASES.items():
            seconds = timeline.between(start, end)
            if seconds is not None:
                self.phase.labels(phase).observe(max(seconds, 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
