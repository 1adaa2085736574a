"""Event-driven simulation: drive the policy objects with a virtual clock and profiled step times.

Single-pipeline policies (RRA, static, continuous) run as one worker over all devices. WAA runs
an encoder pipeline and a decoder pipeline side by side: the encoder starts a batch every
bottleneck interval, the batch's KV caches reach the decoder after the pipeline path plus the
hand-off transfer, and the decoder merges them at its next iteration boundary.

Step costs use each step's real requests (prompt lengths, current contexts), unlike the mean-field
``optimizer.analytic`` model, which this simulation checks.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from optimizer.analytic import Scenario, WorkloadStats
from optimizer.cluster import p2p_s
from optimizer.layout import PipelineLayout
from optimizer.policies import (BatchingPolicy, QueuedRequest, RunningRequest, StepPlan, WorkerState,
                                make_policy)
from optimizer.profile import StepShape
from optimizer.schedule import Schedule
from optimizer.timing import PipelineTimer, memory_per_device


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    input_len: int
    output_len: int
    arrival_s: float = 0.0


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    input_len: int
    output_len: int
    arrival_s: float
    encode_start_s: float
    first_token_s: float
    finish_s: float
    tokens: int  # tokens the simulation produced for it

    @property
    def service_s(self) -> float:
        return self.finish_s - self.encode_start_s


@dataclass(frozen=True)
class DecodeStep:
    start_s: float
    duration_s: float
    batch: int  # requests decoded (padding excluded)
    encoded_before: int  # requests encoded up to the step's start


@dataclass(frozen=True)
class SimulationResult:
    records: tuple[RequestRecord, ...]
    decode_steps: tuple[DecodeStep, ...]
    throughput_seq_s: float  # completions per second over the middle 60 % of completions
    throughput_tok_s: float
    latency_p99_len_s: float  # median service time of requests with a >= p99 output length
    e2e_s: dict[str, float]  # p50/p90/p99 of finish - arrival
    ttft_s: dict[str, float]
    tpot_s: dict[str, float]
    mean_decode_batch: float  # time-weighted over the measurement window
    peak_running: int
    memory_per_device_bytes: float
    fits_memory: bool


def requests_from_workload(sc: Scenario, rng: np.random.Generator, n: int, rate_per_s: float = 0.0):
    """``n`` requests drawn from the workload; all at t=0 (saturated) or Poisson at ``rate_per_s``."""
    ins, outs = sc.workload.sample(rng, n)
    times = np.cumsum(rng.exponential(1 / rate_per_s, n)) if rate_per_s > 0 else np.zeros(n)
    return tuple(SimRequest(f"r{i}", int(a), int(b), float(t)) for i, (a, b, t) in enumerate(zip(ins, outs, times)))


class _Costs:
    """Step times of real batches on one pipeline."""

    def __init__(self, timer: PipelineTimer, microbatches: int) -> None:
        self.timer, self.m = timer, microbatches
        self.t5 = bool(timer.model.encoder_layers)

    def shape(self, prompts: list[int], contexts: list[int], padding: int, enc_lens: list[int]) -> StepShape:
        n_pre, n_dec = len(prompts), len(contexts) + padding
        eff = math.sqrt(sum(p * p for p in prompts) / n_pre) if prompts else 1.0
        ctx = sum(contexts) / len(contexts) if contexts else 1.0
        enc = sum(enc_lens) / len(enc_lens) if (enc_lens and self.t5) else 0.0
        return StepShape(float(n_pre), float(sum(prompts)), eff, float(n_dec), ctx, enc)

    def encode_path_s(self, shape: StepShape) -> float:
        return float(self.timer.path_s(shape))

    def encode_interval_s(self, shape: StepShape) -> float:
        return float(self.timer.bottleneck_s(shape))

    def iteration_s(self, shape: StepShape) -> float:
        if shape.decode_seqs == 0:
            return self.encode_path_s(shape)
        return float(self.timer.iteration_s(shape, self.m))


class _Book:
    """Request bookkeeping shared by the drivers: queue, running batch, records."""

    def __init__(self, requests) -> None:
        self.pending = deque(sorted(requests, key=lambda r: r.arrival_s))
        self.queue: deque[SimRequest] = deque()
        self.by_id = {r.request_id: r for r in requests}
        self.generated: dict[str, int] = {}
        self.start: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.records: list[RequestRecord] = []
        self.steps: list[DecodeStep] = []
        self.peak = 0

    def arrive(self, now: float) -> None:
        while self.pending and self.pending[0].arrival_s <= now:
            self.queue.append(self.pending.popleft())

    def next_arrival(self) -> float:
        return self.pending[0].arrival_s if self.pending else math.inf

    def head(self, n: int) -> tuple[QueuedRequest, ...]:
        return tuple(QueuedRequest(r.request_id, r.input_len, r.arrival_s) for _, r in zip(range(n), self.queue))

    def take(self, ids, now: float) -> None:
        wanted = set(ids)
        self.queue = deque(r for r in self.queue if r.request_id not in wanted)
        for i in ids:
            self.start[i] = now

    def running_view(self, ids) -> tuple[RunningRequest, ...]:
        return tuple(RunningRequest(i, self.by_id[i].input_len, self.generated[i]) for i in ids)

    def emit(self, rid: str, now: float) -> bool:
        """One token for ``rid`` at ``now``; True when it finishes the request."""
        self.generated[rid] = self.generated.get(rid, 0) + 1
        self.first.setdefault(rid, now)
        req = self.by_id[rid]
        if self.generated[rid] < req.output_len:
            return False
        self.records.append(RequestRecord(rid, req.input_len, req.output_len, req.arrival_s,
                                          self.start[rid], self.first[rid], now, self.generated[rid]))
        return True

    def context(self, rid: str) -> int:
        return self.by_id[rid].input_len + self.generated[rid]


def _run_single(book: _Book, policy: BatchingPolicy, costs: _Costs, window: int) -> None:
    now, running = 0.0, []
    while book.pending or book.queue or running:
        book.arrive(now)
        plan = policy.next_step(WorkerState(book.head(window), book.running_view(running)))
        if plan.idle:
            now = book.next_arrival()
            continue
        shape = costs.shape([book.by_id[i].input_len for i in plan.encode],
                            [book.context(i) for i in plan.decode], plan.padding, [])
        dt = costs.iteration_s(shape)
        book.take(plan.encode, now)
        if plan.decode:
            book.steps.append(DecodeStep(now, dt, len(plan.decode), len(book.start)))
        now += dt
        finished = [i for i in plan.decode + plan.encode if book.emit(i, now)]
        done = set(finished)
        running = [i for i in running + list(plan.encode) if i not in done]
        book.peak = max(book.peak, len(running))
        policy.on_step_done(plan, finished)


class _WaaDriver:
    """An encoder pipeline and a decoder pipeline, each acting at its own next free time."""

    def __init__(self, book: _Book, schedule: Schedule, enc: _Costs, dec: _Costs, kv_link,
                 kv_bytes_token: float, window: int) -> None:
        self.book, self.schedule, self.enc, self.dec = book, schedule, enc, dec
        self.kv_link, self.kv_bytes_token, self.window = kv_link, kv_bytes_token, window
        self.encoder, self.decoder = make_policy(schedule, "encoder"), make_policy(schedule, "decoder")
        self.t_enc = self.t_dec = self.clock = 0.0
        self.inflight: list[tuple[float, int, tuple[str, ...]]] = []  # (ready time, batch no, ids)
        self.batches = 0
        self.ready: list[str] = []
        self.running: list[str] = []
        self.step: StepPlan | None = None  # the decode step in flight, applied when it ends

    def run(self) -> None:
        while True:
            enc_at, dec_at = self._encoder_next(), self._decoder_next()
            if math.isinf(enc_at) and math.isinf(dec_at):
                return
            if dec_at <= enc_at:
                self.clock = dec_at
                self._decode(dec_at)
            else:
                self.clock = enc_at
                self._encode(enc_at)

    def _free_slots(self) -> int:
        pending = len(self.ready) + sum(len(ids) for _, _, ids in self.inflight)
        return self.schedule.decode_batch - len(self.running) - pending

    def _encoder_next(self) -> float:
        if not (self.book.queue or self.book.pending):
            return math.inf
        at = self.t_enc if self.book.queue else max(self.t_enc, self.book.next_arrival())
        at = max(at, self.clock)  # a blocked encoder resumes when room appears, not before
        return at if self._free_slots() > 0 else max(at, self._decoder_next())

    def _decoder_next(self) -> float:
        if self.step is not None or self.running or self.ready:
            return self.t_dec
        return max(self.t_dec, self.inflight[0][0]) if self.inflight else math.inf

    def _encode(self, now: float) -> None:
        self.book.arrive(now)
        state = WorkerState(self.book.head(self.window), downstream_free=self._free_slots())
        plan = self.encoder.next_step(state)
        if plan.idle:  # no room downstream before the decoder's current step ends
            self.t_enc = max(now, self._decoder_next())
            return
        lens = [self.book.by_id[i].input_len for i in plan.encode]
        shape = self.enc.shape(lens, [], 0, [])
        self.book.take(plan.encode, now)
        done_at = now + self.enc.encode_path_s(shape)
        finished = [i for i in plan.encode if self.book.emit(i, done_at)]
        moving = tuple(i for i in plan.encode if i not in set(finished))
        if moving:
            transfer = p2p_s(self.kv_link, self.kv_bytes_token * sum(lens))
            heapq.heappush(self.inflight, (done_at + transfer, self.batches, moving))
            self.batches += 1
        self.t_enc = now + self.enc.encode_interval_s(shape)
        self.encoder.on_step_done(plan, finished)

    def _finish_step(self) -> None:
        """Apply the decode step that ends now: its tokens, finished requests, freed slots."""
        if self.step is None:
            return
        plan, self.step = self.step, None
        finished = [i for i in plan.decode if self.book.emit(i, self.t_dec)]
        done = set(finished)
        self.running = [i for i in self.running if i not in done]
        self.decoder.on_step_done(plan, finished)

    def _decode(self, now: float) -> None:
        self.t_dec = now
        self._finish_step()
        while self.inflight and self.inflight[0][0] <= now:
            self.ready.extend(heapq.heappop(self.inflight)[2])
        book = self.book
        plan = self.decoder.next_step(WorkerState(running=book.running_view(self.running),
                                                  incoming=book.running_view(self.ready)))
        if plan.idle:
            return
        admitted = set(plan.admit)
        self.ready = [i for i in self.ready if i not in admitted]
        self.running += list(plan.admit)
        book.peak = max(book.peak, len(self.running))
        shape = self.dec.shape([], [book.context(i) for i in plan.decode], 0,
                               [book.by_id[i].input_len for i in plan.decode])
        dt = self.dec.iteration_s(shape)
        book.steps.append(DecodeStep(now, dt, len(plan.decode), len(book.start)))
        self.step, self.t_dec = plan, now + dt


def _pcts(values) -> dict[str, float]:
    if len(values) == 0:
        return {"p50": math.nan, "p90": math.nan, "p99": math.nan}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def _window(records) -> tuple[float, float, list[RequestRecord]]:
    finish = sorted(r.finish_s for r in records)
    lo, hi = finish[int(0.2 * (len(finish) - 1))], finish[int(0.8 * (len(finish) - 1))]
    return lo, hi, [r for r in records if lo < r.finish_s <= hi]


def _summary(book: _Book, stats: WorkloadStats, memory: float, capacity: float) -> SimulationResult:
    recs = tuple(sorted(book.records, key=lambda r: r.request_id))
    lo, hi, mid = _window(recs)
    span = hi - lo
    thr = len(mid) / span if span > 0 else math.nan
    steps = [s for s in book.steps if lo <= s.start_s < hi]
    busy = sum(s.duration_s for s in steps)
    batch = sum(s.batch * s.duration_s for s in steps) / busy if busy else math.nan
    long = [r.service_s for r in (mid or recs) if r.output_len >= stats.o99]
    tpot = [(r.finish_s - r.first_token_s) / (r.output_len - 1) for r in recs if r.output_len > 1]
    return SimulationResult(
        recs, tuple(book.steps), thr, thr * float(np.mean([r.output_len for r in mid])) if mid else math.nan,
        float(np.median(long)) if long else math.nan,
        _pcts([r.finish_s - r.arrival_s for r in recs]), _pcts([r.first_token_s - r.arrival_s for r in recs]),
        _pcts(tpot), batch, book.peak, memory, memory <= capacity)


def within_bound(result: SimulationResult, latency_bound_s: float) -> float:
    """Fraction of requests whose end-to-end latency (from arrival) meets the bound."""
    return sum(r.finish_s - r.arrival_s <= latency_bound_s for r in result.records) / len(result.records)


def goodput_seq_s(result: SimulationResult, ttft_slo_s: float, tpot_slo_s: float) -> float:
    """Completions per second, over the measurement window, of requests meeting both SLOs."""
    lo, hi, mid = _window(result.records)
    good = [r for r in mid if r.first_token_s - r.arrival_s <= ttft_slo_s
            and (r.output_len == 1 or (r.finish_s - r.first_token_s) / (r.output_len - 1) <= tpot_slo_s)]
    return len(good) / (hi - lo) if hi > lo else math.nan


def simulate(sc: Scenario, schedule: Schedule, requests) -> SimulationResult:
    """Run ``requests`` (see ``requests_from_workload``) under ``schedule``; deterministic."""
    if not requests:
        raise ValueError("simulate needs at least one request")
    stats = WorkloadStats(sc.workload)
    book = _Book(requests)
    window = max(schedule.encode_batch, schedule.decode_batch)
    k = schedule.tp_degree
    if schedule.policy in ("waa-c", "waa-m"):
        enc_l = sc.layout(schedule.encoder_devices, k, schedule.encoder_devices // k)
        dec_l = sc.layout(schedule.decoder_devices, k, schedule.decoder_devices // k, schedule.encoder_devices)
        link = sc.cluster.link_between(schedule.encoder_devices - 1, schedule.encoder_devices)
        kv_tok = sc.model.kv_bytes_per_token_layer * sc.model.layers
        _WaaDriver(book, schedule, _Costs(sc.timer(enc_l), 1), _Costs(sc.timer(dec_l), schedule.decode_microbatches),
                   link, kv_tok, window).run()
        memory = float(memory_per_device(dec_l, sc.model, book.peak, stats.slot_tokens))
    else:
        layout = sc.layout(schedule.num_devices, k, schedule.tp_stages)
        _run_single(book, make_policy(schedule), _Costs(sc.timer(layout), schedule.decode_microbatches), window)
        slot = stats.static_slot_tokens if schedule.policy == "static" else stats.slot_tokens
        memory = float(memory_per_device(layout, sc.model, book.peak, slot))
    return _summary(book, stats, memory, sc.cluster.usable_memory_bytes)


def waa_layouts(sc: Scenario, schedule: Schedule) -> tuple[PipelineLayout, PipelineLayout]:
    k = schedule.tp_degree
    return (sc.layout(schedule.encoder_devices, k, schedule.encoder_devices // k),
            sc.layout(schedule.decoder_devices, k, schedule.decoder_devices // k, schedule.encoder_devices))
