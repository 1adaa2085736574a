"""Prometheus metrics of one worker process, in its own registry.

Per step: the batch sizes (``exegpt_worker_batch_size{phase}``: encode = prompts prefilled,
decode = requests advanced one token) and the step's time (``exegpt_worker_step_seconds{phase}``,
phase = what the step ran: encode, decode or mixed). At each scrape: the role and schedule
version in force, requests running, and the KV cache's use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from optimizer.policies import StepPlan

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
OUTCOMES = ("finished", "handed_off", "given_back", "refused", "failed")


def step_phase(plan: StepPlan) -> str:
    decodes = bool(plan.decode or plan.admit)
    prefills = bool(plan.encode or plan.chunks)
    if prefills and decodes:
        return "mixed"
    return "encode" if prefills else "decode"


class WorkerMetrics:
    def __init__(self, state: Callable[[], WorkerState]) -> None:
        self.registry = r = CollectorRegistry()
        self.batch_size = Histogram(
            "exegpt_worker_batch_size",
            "Requests per step, by phase (encode: prompts prefilled; decode: requests advanced one token)",
            ["phase"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "exegpt_worker_step_seconds",
            "Engine time of one step, by what it ran (encode, decode or mixed)",
            ["phase"],
            buckets=STEP_BUCKETS_S,
            registry=r,
        )
        self.steps = Counter("exegpt_worker_steps", "Engine steps run", ["phase"], registry=r)
        self.tokens = Counter("exegpt_worker_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("exegpt_worker_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.requests = Counter(
            "exegpt_worker_requests", "Requests that left this worker, by outcome", ["outcome"], registry=r
        )
        r.register(_StateCollector(state))

    def step(
        self, plan: StepPlan, seconds: float, prompt_tokens: int, generated: int, outcomes: dict[str, int]
    ) -> None:
        phase = step_phase(plan)
        if plan.encode:
            self.batch_size.labels("encode").observe(len(plan.encode))
        if plan.decode:
            self.batch_size.labels("decode").observe(len(plan.decode))
        self.step_seconds.labels(phase).observe(max(seconds, 0.0))
        self.steps.labels(phase).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.tokens.inc(generated)
        for outcome, count in outcomes.items():
            if count:
                self.requests.labels(outcome).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class WorkerState:
    """What a scrape reads off the worker at that moment."""

    def __init__(
        self,
        *,
        worker_id: str,
        role: str,
        version: int,
        running: int,
        held: int,
        decode_slots: int,
        kv_tokens: int,
        kv_bytes_per_token: int | None,
        kv_allocated_bytes: int | None,
        ready: bool,
    ) -> None:
        self.worker_id, self.role, self.version = worker_id, role, version
        self.running, self.held, self.decode_slots = running, held, decode_slots
        self.kv_tokens, self.kv_bytes_per_token = kv_tokens, kv_bytes_per_token
        self.kv_allocated_bytes, self.ready = kv_allocated_bytes, ready


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], WorkerState]) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.state()
        info = GaugeMetricFamily(
            "exegpt_worker_info", "This worker's id and current role (1)", labels=["worker", "role"]
        )
        info.add_metric([s.worker_id, s.role], 1)
        yield info
        yield GaugeMetricFamily("exegpt_worker_schedule_version", "Schedule version this worker runs", value=s.version)
        yield GaugeMetricFamily("exegpt_worker_requests_running", "Requests in the engine", value=s.running)
        yield GaugeMetricFamily(
            "exegpt_worker_requests_held",
            "Requests taken from the queues and not yet left (running or waiting for a slot)",
            value=s.held,
        )
        yield GaugeMetricFamily(
            "exegpt_worker_decode_slots",
            "Decode batch the schedule gives this worker (B_D; 0 for an encoder)",
            value=s.decode_slots,
        )
        yield GaugeMetricFamily(
            "exegpt_worker_kv_cache_tokens", "Tokens the running requests hold in the KV cache", value=s.kv_tokens
        )
        if s.kv_bytes_per_token is not None:
            yield GaugeMetricFamily(
                "exegpt_worker_kv_cache_used_bytes",
                "KV-cache bytes the running requests hold",
                value=s.kv_tokens * s.kv_bytes_per_token,
            )
        if s.kv_allocated_bytes is not None:
            yield GaugeMetricFamily(
                "exegpt_worker_kv_cache_allocated_bytes",
                "KV-cache bytes the engine has allocated",
                value=s.kv_allocated_bytes,
            )
        yield GaugeMetricFamily("exegpt_worker_ready", "1 when the worker takes work", value=float(s.ready))

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())
