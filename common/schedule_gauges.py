"""The scheduler's decisions as Prometheus gauges, for every process that exports them: the
scheduler itself (from memory, while it leads) and each gateway (from the records in the store).

``ScheduleGauges`` turns the current ScheduleUpdate and SchedulerState into the
``exegpt_schedule_*``, ``exegpt_length_quantile``, ``exegpt_arrival_*`` and
``exegpt_scheduler_workers`` gauges; a record that is absent leaves its gauges out (not zeros).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from common.messages.control import ScheduleUpdate
from common.messages.status import SchedulerState

QUANTILES = ("0.5", "0.9", "0.99")  # SchedulerState's (p50, p90, p99)

# gauge -> (help, the SchedulerState field it reads)
STATE_GAUGES: dict[str, tuple[str, str]] = {
    "exegpt_schedule_pinned": ("1 when an operator pinned the schedule", "pinned"),
    "exegpt_schedule_latency_bound_seconds": ("Latency bound planned for (absent: none)", "latency_bound_s"),
    "exegpt_schedule_predicted_throughput": ("Throughput the plan predicts, sequences/s", "predicted_throughput_seq_s"),
    "exegpt_schedule_observed_throughput": (
        "Throughput observed under the schedule, sequences/s",
        "observed_throughput_seq_s",
    ),
    "exegpt_schedule_predicted_latency_seconds": ("p99-length latency the plan predicts", "predicted_latency_s"),
    "exegpt_schedule_observed_latency_seconds": ("p99 end-to-end latency observed", "observed_latency_s"),
    "exegpt_schedule_drift_statistic": ("Two-sample drift test's statistic at the last check", "drift_statistic"),
    "exegpt_schedule_replans": ("Searches run since this scheduler took the lead", "replans"),
    "exegpt_schedule_last_search_seconds": ("Wall time of the scheduler's last search", "last_search_s"),
    "exegpt_arrival_rate": ("Arrival rate the statistics hold, requests/s", "arrival_rate_s"),
    "exegpt_arrival_cv": ("Coefficient of variation of inter-arrival gaps", "arrival_cv"),
    "exegpt_scheduler_workers": ("Live workers the allocation covers", "workers"),
    "exegpt_schedule_raw_predicted_throughput": (
        "Throughput the plan predicts on the raw profile (no calibration), sequences/s",
        "raw_predicted_throughput_seq_s",
    ),
    "exegpt_schedule_raw_predicted_latency_seconds": (
        "p99-length latency the plan predicts on the raw profile",
        "raw_predicted_latency_s",
    ),
    "exegpt_slo_ttft_bound_seconds": ("TTFT bound planned for (absent: none)", "ttft_bound_s"),
    "exegpt_slo_tpot_bound_seconds": ("TPOT bound planned for (absent: none)", "tpot_bound_s"),
    "exegpt_slo_predicted_attainment": (
        "Share of requests the plan predicts meet the SLO at the forecast",
        "predicted_attainment",
    ),
    "exegpt_slo_raw_predicted_attainment": ("The same on the raw profile (no calibration)", "raw_predicted_attainment"),
    "exegpt_slo_observed_attainment": ("Share of requests that met the SLO over the last 30 s", "observed_attainment"),
    "exegpt_forecast_arrival_rate": ("Arrival rate the plan is made for, requests/s (0: saturated)", "forecast_rate_s"),
    "exegpt_forecast_arrival_cv": ("Burstiness the plan is made for (CV of inter-arrival gaps)", "forecast_cv"),
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
        yield GaugeMetricFamily(
            "exegpt_schedule_infeasible",
            "1 when no schedule meets the latency bound (the least-latency one runs): the alert",
            value=float(not state.meets_bound),
        )
        lengths = GaugeMetricFamily(
            "exegpt_length_quantile", "Length quantiles the plan is based on, tokens", labels=["kind", "quantile"]
        )
        for kind, values in (("input", state.input_quantiles), ("output", state.output_quantiles)):
            for quantile, value in zip(QUANTILES, values):
                lengths.add_metric([kind, quantile], value)
        yield lengths
        factors = GaugeMetricFamily(
            "exegpt_calibration_factor",
            "Measured / profiled seconds of a step, by kind and step tokens (1: the profile as measured)",
            labels=["kind", "tokens"],
        )
        for point in state.calibration:
            factors.add_metric([point.kind, f"{point.tokens:.0f}"], point.factor)
        yield factors

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # names vary with the records: collected at each scrape only
