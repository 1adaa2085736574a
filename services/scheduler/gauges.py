"""One scheduler process's metrics: whether it leads, the workers it hears, and while it leads the
schedule gauges (``common.schedule_gauges``) from its own memory."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.schedule_gauges import ScheduleGauges


class SchedulerMetrics(Collector):
    """One scheduler process's metrics: whether it leads, the workers it hears, and (while it
    leads) the schedule gauges from its own memory."""

    def __init__(self, scheduler) -> None:  # a services.scheduler.service.SchedulerService
        self.scheduler = scheduler
        self.gauges = ScheduleGauges()
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        s = self.scheduler
        leading = bool(s.leadership.leading)
        yield GaugeMetricFamily(
            "exegpt_scheduler_leader", "1 while this scheduler holds the lease", value=float(leading)
        )
        heard = GaugeMetricFamily(
            "exegpt_scheduler_workers_heard",
            "Workers heard within the heartbeat timeout, by the role they report",
            labels=["role"],
        )
        roles: dict[str, int] = {}
        for status in s.workers.values():
            roles[status.role] = roles.get(status.role, 0) + 1
        for role, count in sorted(roles.items()):
            heard.add_metric([role], count)
        yield heard
        yield CounterMetricFamily(
            "exegpt_scheduler_publishes_refused",
            "Schedule publishes refused because the lease had been lost",
            value=s.refused,
        )
        if leading:
            self.gauges.update, self.gauges.state = s.current, s.state(time.time())
            yield from self.gauges.collect()

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())

    def render(self) -> bytes:
        return generate_latest(self.registry)
