"""Event-driven simulation: drive the policy objects with a virtual clock and profiled step times.

Each simulated worker runs ``optimizer.driver.Driver`` with the policy object a real worker runs
(only the executor differs: here a cost model on a virtual clock). Single-pipeline policies (RRA,
static, continuous, mixed) run one worker over all devices, or ``Schedule.workers`` replicas to
which the broker delivers arrivals in turn, each up to its prefetch (``_Fleet.deliver``). WAA runs
encoders and decoders side by side: an encoder starts a batch every bottleneck interval, once it
holds credits (free decode slots, as the mesh's credit counter grants them); the batch's KV caches
reach the decoders after the pipeline path plus the hand-off transfer, and a decoder merges them
at its next iteration boundary.

Step costs use each step's real requests (prompt lengths, current contexts), unlike the mean-field
``optimizer.analytic`` model, which this simulation checks.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from typing import TypeVar, cast

import numpy as np

from optimizer.analytic import Scenario, WorkloadStats
from optimizer.cluster import Link, p2p_s
from optimizer.driver import Driver, StepOutcome
from optimizer.layout import PipelineLayout
from optimizer.policies import QueuedRequest, Role, RunningRequest, StepPlan, fused_steps, intake_prefetch, make_policy
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


def requests_from_workload(
    sc: Scenario, rng: np.random.Generator, n: int, rate_per_s: float = 0.0
) -> tuple[SimRequest, ...]:
    """``n`` requests drawn from the workload; all at t=0 (saturated) or Poisson at ``rate_per_s``."""
    ins, outs = sc.workload.sample(rng, n)
    times = np.cumsum(rng.exponential(1 / rate_per_s, n)) if rate_per_s > 0 else np.zeros(n)
    return tuple(SimRequest(f"r{i}", int(a), int(b), float(t)) for i, (a, b, t) in enumerate(zip(ins, outs, times)))


class _Costs:
    """Step times of real batches on one pipeline: a decode iteration in ``microbatches``
    micro-batches, an encode-only step in ``encode_microbatches`` following each other through the
    pipeline, and a step that does both as its prefill pass and then its decode iteration
    (``PipelineTimer.mixed_s``, prefill in ``microbatches``). ``fused`` (mixed steps): whatever a
    step holds, decode rows and prompt chunks, is one pass (the engine runs it as one forward)."""

    def __init__(
        self,
        timer: PipelineTimer,
        microbatches: int,
        encode_microbatches: int = 1,
        fused: bool = False,
        memo: dict[tuple[object, ...], float] | None = None,
    ) -> None:
        self.timer, self.m, self.me, self.fused = timer, microbatches, encode_microbatches, fused
        self.t5 = bool(timer.model.encoder_layers)
        # step times by shape, shared by the simulations of one scenario on this pipeline (a search
        # weighs many schedules on the same arrivals: their batches repeat the same shapes)
        self.memo = {} if memo is None else memo

    def _memo(self, kind: str, shape: StepShape, compute: Callable[[], float]) -> float:
        key = (
            kind,
            shape.prefill_seqs,
            shape.prefill_tokens,
            shape.prefill_seq,
            shape.decode_seqs,
            shape.decode_ctx,
            shape.enc_seq,
        )
        seconds = self.memo.get(key)
        if seconds is None:
            if len(self.memo) >= MEMO_MAX:
                self.memo.clear()
            seconds = self.memo[key] = compute()
        return seconds

    def shape(
        self,
        prompts: list[int],
        contexts: list[int],
        padding: int,
        enc_lens: list[int],
        chunks: Sequence[tuple[int, int]] = (),
    ) -> StepShape:
        """``chunks``: (start, length) of each prompt chunk; its attention is a whole prompt's of
        length sqrt(length x (2 start + length)) (the same work: a prompt's chunks add up to it)."""
        n_pre, n_dec = len(prompts) + len(chunks), len(contexts) + padding
        squares = [p * p for p in prompts] + [n * (2 * a + n) for a, n in chunks]
        eff = math.sqrt(sum(squares) / n_pre) if n_pre else 1.0
        ctx = sum(contexts) / len(contexts) if contexts else 1.0
        enc = sum(enc_lens) / len(enc_lens) if (enc_lens and self.t5) else 0.0
        tokens = sum(prompts) + sum(n for _, n in chunks)
        return StepShape(float(n_pre), float(tokens), eff, float(n_dec), ctx, enc)

    def encode_path_s(self, shape: StepShape) -> float:
        return self._memo("path", shape, lambda: float(self.timer.path_s(shape)))

    def encode_interval_s(self, shape: StepShape) -> float:
        return self._memo("interval", shape, lambda: float(self.timer.bottleneck_s(shape)))

    def iteration_s(self, shape: StepShape) -> float:
        return self._memo("step", shape, lambda: self._iteration_s(shape))

    def _iteration_s(self, shape: StepShape) -> float:
        if self.fused:
            return float(self.timer.iteration_s(shape, self.m))
        if shape.decode_seqs == 0:
            return float(self.timer.encode_s(shape, self.me))
        if shape.prefill_seqs == 0:
            return float(self.timer.iteration_s(shape, self.m))
        return float(self.timer.mixed_s(shape, self.m))


MEMO_MAX = 200_000  # step times one pipeline's memo keeps (then it starts again)
ARRIVAL_SLACK_S = 1e-9  # an arrival this close to a step boundary counts as arrived at it


class _Book:
    """Request bookkeeping shared by the simulated workers: arrivals, the queue, records.

    ``closed_loop`` > 0: that many requests are released at the start and each completion
    releases the next one ``loop_delay_s`` after its finish time (a saturated closed-loop client
    whose answer takes that long to reach the workers)."""

    def __init__(self, requests: Sequence[SimRequest], closed_loop: int = 0, loop_delay_s: float = 0.0) -> None:
        if loop_delay_s < 0:
            raise ValueError(f"loop_delay_s must be >= 0, got {loop_delay_s}")
        self.by_id = {r.request_id: r for r in requests}
        self.closed_loop, self.loop_delay_s = closed_loop, loop_delay_s
        ordered = sorted(requests, key=lambda r: r.arrival_s)
        if closed_loop:
            self.held = deque(ordered[closed_loop:])
            ordered = [replace(r, arrival_s=0.0) for r in ordered[:closed_loop]]
            self.by_id.update((r.request_id, r) for r in ordered)
        self.pending = deque(ordered)
        self.queue: dict[str, QueuedRequest] = {}  # arrived, not taken by a worker
        self.generated: dict[str, int] = {}
        self.start: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.records: list[RequestRecord] = []
        self.steps: list[DecodeStep] = []
        self.peak = 0
        # where the broker delivers to replica workers (``_Fleet.deliver``): arrived, not yet
        # delivered (in arrival order), and each worker's delivered queue
        self.delivering = False
        self.undelivered: deque[str] = deque()
        self.owner: dict[str, int] = {}
        self.delivered: list[dict[str, QueuedRequest]] = []

    def arrive(self, now: float) -> None:
        while self.pending and self.pending[0].arrival_s <= now + ARRIVAL_SLACK_S:
            r = self.pending.popleft()
            self.queue[r.request_id] = QueuedRequest(r.request_id, r.input_len, r.arrival_s)
            if self.delivering:
                self.undelivered.append(r.request_id)

    def next_arrival(self) -> float:
        return self.pending[0].arrival_s if self.pending else math.inf

    def head(self, n: int, who: int | None = None) -> dict[str, QueuedRequest]:
        """The first ``n`` queued (of those delivered to worker ``who``; None: of all)."""
        return dict(islice((self.queue if who is None else self.delivered[who]).items(), n))

    def waiting_for(self, who: int | None) -> bool:
        """Whether anything queued is for worker ``who`` (None: for any worker)."""
        return bool(self.queue if who is None else self.delivered[who])

    def deliver(self, rid: str, who: int) -> None:
        self.owner[rid] = who
        self.delivered[who][rid] = self.queue[rid]

    def take(self, ids: Iterable[str], now: float) -> None:
        for i in ids:
            del self.queue[i]
            if i in self.owner:
                del self.delivered[self.owner[i]][i]
            self.start[i] = now

    def emit(self, rid: str, now: float) -> bool:
        """One token for ``rid`` at ``now``; True when it finishes the request."""
        self.generated[rid] = self.generated.get(rid, 0) + 1
        self.first.setdefault(rid, now)
        req = self.by_id[rid]
        if self.generated[rid] < req.output_len:
            return False
        self.records.append(
            RequestRecord(
                rid,
                req.input_len,
                req.output_len,
                req.arrival_s,
                self.start[rid],
                self.first[rid],
                now,
                self.generated[rid],
            )
        )
        if self.closed_loop and self.held:
            nxt = replace(self.held.popleft(), arrival_s=now + self.loop_delay_s)
            self.by_id[nxt.request_id] = nxt
            self.pending.append(nxt)  # completions come in time order, so arrivals stay sorted
        return True

    def context(self, rid: str) -> int:
        return self.by_id[rid].input_len + self.generated[rid]

    @property
    def done(self) -> bool:
        return not (self.pending or self.queue) and len(self.records) == len(self.by_id)


class _Fleet:
    """What the simulated workers share: the book, WAA's credits and hand-offs in flight."""

    def __init__(self, book: _Book, kv_link: Link | None = None, kv_bytes_token: float = 0.0) -> None:
        self.book = book
        self.kv_link, self.kv_bytes_token = kv_link, kv_bytes_token
        self.credits = 0  # free decode slots not yet promised (the mesh's credit counter)
        self.handoffs: list[tuple[float, int, str]] = []  # (ready at, order, request id)
        self.order = 0
        self.workers: list[_SimWorker] = []
        self.turn = 0  # the next worker in the broker's round
        self.unacked: list[int] = []  # per worker: requests delivered to it and not finished

    def deliver(self) -> None:
        """The broker's delivery to replica workers (``_Book.delivering``): each queued request not
        yet delivered goes, in arrival order, to the next worker in turn with room under its
        prefetch (``prefetch_of``), as RabbitMQ's round robin among consumers does; a request that
        finds no room waits in the broker, and so do those behind it. The worker then serves it
        from its own queue, at its own boundaries: an arrival waits for the worker it went to,
        even while the other one idles. (Seen: a two-worker mesh under Poisson arrivals split the
        prompt tokens between its workers exactly as strict alternation does; a queue shared by
        the simulated workers, which the first at a boundary empties, split them otherwise.)"""
        book, n = self.book, len(self.workers)
        while book.undelivered:
            turn = ((self.turn + k) % n for k in range(n))
            to = next((i for i in turn if self.unacked[i] < self.prefetch_of(i)), None)
            if to is None:
                return
            book.deliver(book.undelivered.popleft(), to)
            self.turn, self.unacked[to] = (to + 1) % n, self.unacked[to] + 1
            self.workers[to].waiting = False  # something outside changed: it plans again

    def prefetch_of(self, i: int) -> int:
        """Worker ``i``'s prefetch now, as a mesh worker sets it (``policies.intake_prefetch``)."""
        w = self.workers[i]
        return intake_prefetch(w.driver.policy, len(w.driver.running), self.unacked[i], w.capacity)

    def hand_off(self, rid: str, at: float, prompt_len: int) -> None:
        # not None: ``simulate`` sets the link of a WAA schedule, the only one whose requests are handed off
        ready = at + p2p_s(cast(Link, self.kv_link), self.kv_bytes_token * prompt_len)
        heapq.heappush(self.handoffs, (ready, self.order, rid))
        self.order += 1

    def next_handoff(self) -> float:
        return self.handoffs[0][0] if self.handoffs else math.inf

    def next_step_end(self, role: str) -> float:
        ends = [w.busy_until for w in self.workers if w.role == role and w.step is not None]
        return min(ends, default=math.inf)


class _SimWorker:
    """One simulated worker: a driver running the policy, its step costs, its time line.

    A step is planned at a boundary, takes its profiled time, and its tokens come at its end.
    An encoder pipeline starts a batch every bottleneck interval; a batch's first tokens come
    after the pipeline's path and its KV caches reach the decoders after the hand-off link."""

    def __init__(
        self,
        fleet: _Fleet,
        role: Role,
        schedule: Schedule,
        costs: _Costs | None,
        step_s: Callable[[StepPlan, StepShape | None], float] | None = None,
    ) -> None:
        self.fleet, self.role, self.costs = fleet, role, costs
        self.driver = Driver(make_policy(schedule, role))
        self.capacity = schedule.decode_batch
        self.step_s = step_s  # replaces the cost model (replaying a recorded run)
        self.busy_until = 0.0
        self.step: StepPlan | None = None
        self.plans: list[StepPlan] = []
        self.waiting = False  # planned idle; wait for something outside to change
        self.who: int | None = None  # its index where the broker delivers to it (``_Fleet.deliver``)
        if role == "decoder":
            fleet.credits += self.capacity

    # --- when this worker acts next --------------------------------------------------------------
    def next_at(self, clock: float) -> float:
        if self.step is not None:
            return self.busy_until
        book = self.fleet.book
        if self.role == "decoder":
            ready = self.driver.running or self.driver.incoming
            at = self.busy_until if ready and not self.waiting else self.fleet.next_handoff()
            return max(at, self.busy_until, clock)
        if self.role == "encoder" and self.fleet.credits <= 0:
            return max(self.busy_until, self.fleet.next_step_end("decoder"), clock)
        work = (book.waiting_for(self.who) or self.driver.running or self.driver.prefilling) and not self.waiting
        at = self.busy_until if work else book.next_arrival()
        if self.waiting and self.driver.running:
            at = min(at, self.fleet.next_step_end("worker"))
        return max(at, self.busy_until, clock)

    # --- one boundary ----------------------------------------------------------------------------
    def act(self, now: float) -> None:
        book = self.fleet.book
        self._finish_step(now)
        book.arrive(now)
        if book.delivering:
            self.fleet.deliver()
        self._intake(now)
        plan = self.driver.plan()
        self.waiting = plan.idle
        if plan.idle:
            return
        self.plans.append(plan)
        book.take(plan.encode + tuple(c.request_id for c in plan.chunks if c.start == 0), now)
        shape = self._shape(plan)
        if self.role == "encoder":
            self._encode(plan, shape, now)
            return
        dt = self._seconds(plan, shape, "iteration_s")
        if plan.decode:
            book.steps.append(DecodeStep(now, dt, len(plan.decode), len(book.start)))
        self.step, self.busy_until = plan, now + dt

    def _intake(self, now: float) -> None:
        d, book = self.driver, self.fleet.book
        if self.role in ("worker", "encoder"):
            d.queued = book.head(d.window, self.who)
        if self.role == "encoder":
            d.downstream_free = max(self.fleet.credits, 0)
        if self.role == "decoder":
            room = self.capacity - len(d.running) - len(d.incoming)
            while room > 0 and self.fleet.handoffs and self.fleet.handoffs[0][0] <= now + ARRIVAL_SLACK_S:
                rid = heapq.heappop(self.fleet.handoffs)[2]
                d.offer(RunningRequest(rid, book.by_id[rid].input_len, book.generated[rid]))
                room -= 1

    def _seconds(self, plan: StepPlan, shape: StepShape | None, figure: str) -> float:
        """A step's seconds: replayed (``step_s``), or the cost model's ``figure`` for its shape."""
        if self.step_s is not None:
            return self.step_s(plan, shape)
        assert self.costs is not None and shape is not None  # (costed steps have a shape)
        return float(getattr(self.costs, figure)(shape))

    def _shape(self, plan: StepPlan) -> StepShape | None:
        book = self.fleet.book
        decode = list(plan.decode)
        if self.costs is None:  # replaying recorded step times
            return None
        return self.costs.shape(
            [book.by_id[i].input_len for i in plan.encode],
            [book.context(i) for i in decode],
            plan.padding,
            [book.by_id[i].input_len for i in decode],
            [(c.start, c.length) for c in plan.chunks],
        )

    def _finish_step(self, now: float) -> None:
        if self.step is None:
            return
        plan, self.step = self.step, None
        book = self.fleet.book
        finished = tuple(i for i in (*plan.first_tokens, *plan.decode) if book.emit(i, now))
        if self.who is not None:
            self.fleet.unacked[self.who] -= len(finished)
        self.driver.complete(plan, StepOutcome(finished))
        if self.role == "decoder":
            self.fleet.credits += len(finished)
        book.peak = max(book.peak, len(self.driver.running) + len(self.driver.prefilling))

    def _encode(self, plan: StepPlan, shape: StepShape | None, now: float) -> None:
        book, fleet = self.fleet.book, self.fleet
        fleet.credits -= len(plan.encode)
        done_at = now + self._seconds(plan, shape, "encode_path_s")
        finished = tuple(i for i in plan.encode if book.emit(i, done_at))
        fleet.credits += len(finished)  # finished at prefill: nothing to hand off
        moving = tuple(i for i in plan.encode if i not in set(finished))
        for rid in moving:
            fleet.hand_off(rid, done_at, book.by_id[rid].input_len)
        self.driver.complete(plan, StepOutcome(finished, moving))
        self.busy_until = done_at if self.step_s else now + self._seconds(plan, shape, "encode_interval_s")


def _run(fleet: _Fleet) -> None:
    """Let the worker that can act first act, until every request finished. At equal times,
    steps that end go first (a worker waiting for them must see their effect)."""
    clock = 0.0
    while not fleet.book.done:
        at, _, worker = min((w.next_at(clock), w.step is None, i) for i, w in enumerate(fleet.workers))
        if math.isinf(at):
            raise RuntimeError("simulation stalled: requests remain but no worker can act")
        clock = at
        fleet.workers[worker].act(clock)


def _pcts(values: Sequence[float]) -> dict[str, float]:
    if len(values) == 0:
        return {"p50": math.nan, "p90": math.nan, "p99": math.nan}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


_Done = TypeVar("_Done", "RequestRecord", "Completion")  # a finished request: simulated, or of a real run


def _window(records: Sequence[_Done]) -> tuple[float, float, list[_Done]]:
    finish = sorted(r.finish_s for r in records)
    lo, hi = finish[int(0.2 * (len(finish) - 1))], finish[int(0.8 * (len(finish) - 1))]
    return lo, hi, [r for r in records if lo < r.finish_s <= hi]


def _saturated(records: Sequence[_Done], outstanding: int) -> tuple[float, float, list[_Done]]:
    finish = sorted(r.finish_s for r in records)
    lo, hi = finish[outstanding - 1], finish[len(finish) - outstanding - 1]
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
        recs,
        tuple(book.steps),
        thr,
        thr * float(np.mean([r.output_len for r in mid])) if mid else math.nan,
        float(np.median(long)) if long else math.nan,
        _pcts([r.finish_s - r.arrival_s for r in recs]),
        _pcts([r.first_token_s - r.arrival_s for r in recs]),
        _pcts(tpot),
        batch,
        book.peak,
        memory,
        memory <= capacity,
    )


@dataclass(frozen=True)
class Completion:
    """One finished request on a time line, real or simulated (any common origin of seconds)."""

    request_id: str
    arrival_s: float  # when it reached the encode queue
    finish_s: float  # its last token


@dataclass(frozen=True)
class LoadFigures:
    throughput_seq_s: float  # completions per second while the load was saturated
    p99_length_latency_s: float  # median finish - arrival of the probes finishing in that window
    probes: int  # probes the latency is taken over


def load_figures(completions: Iterable[Completion], probes: Iterable[str], outstanding: int = 0) -> LoadFigures:
    """Throughput and p99-length latency of a run: the one definition applied to a measured run
    and to its simulation. ``probes`` are the ids of requests made at the workload's 99th
    percentile input and output length; their latency (arrival at the encode queue to last
    token) is the run's p99-length latency. Both figures come from the saturated part of the run:
    with a closed loop of ``outstanding`` requests, the completions after the first
    ``outstanding`` (the first wave) and before the last ``outstanding`` (the drain); otherwise,
    or when that leaves too few, the middle 60 % (when no probe finishes in the window, every
    probe counts)."""
    done = list(completions)
    if not done:
        raise ValueError("no completions")
    lo, hi, mid = _saturated(done, outstanding) if len(done) >= 4 * outstanding > 0 else _window(done)
    wanted = set(probes)
    inside = [c for c in mid if c.request_id in wanted] or [c for c in done if c.request_id in wanted]
    latency = float(np.median([c.finish_s - c.arrival_s for c in inside])) if inside else math.nan
    return LoadFigures(len(mid) / (hi - lo) if hi > lo else math.nan, latency, len(inside))


def within_bound(result: SimulationResult, latency_bound_s: float) -> float:
    """Fraction of requests whose end-to-end latency (from arrival) meets the bound."""
    return sum(r.finish_s - r.arrival_s <= latency_bound_s for r in result.records) / len(result.records)


def goodput_seq_s(result: SimulationResult, ttft_slo_s: float, tpot_slo_s: float) -> float:
    """Completions per second, over the measurement window, of requests meeting both SLOs."""
    lo, hi, mid = _window(result.records)
    good = [
        r
        for r in mid
        if r.first_token_s - r.arrival_s <= ttft_slo_s
        and (r.output_len == 1 or (r.finish_s - r.first_token_s) / (r.output_len - 1) <= tpot_slo_s)
    ]
    return len(good) / (hi - lo) if hi > lo else math.nan


def simulate(
    sc: Scenario, schedule: Schedule, requests: Sequence[SimRequest], *, closed_loop: int = 0, loop_delay_s: float = 0.0
) -> SimulationResult:
    """Run ``requests`` (see ``requests_from_workload``) under ``schedule``; deterministic.

    ``closed_loop`` > 0 ignores the requests' arrival times: that many are outstanding at any
    time, each completion releasing the next, which arrives ``loop_delay_s`` later (a saturated
    closed-loop client; with a delay, a freed slot is filled at a later step boundary, as in a
    real mesh where the answer and the next request cross the broker)."""
    if not requests:
        raise ValueError("simulate needs at least one request")
    stats = WorkloadStats(sc.workload)
    fleet = _Fleet(_Book(requests, closed_loop, loop_delay_s))
    if schedule.split:
        enc_l, dec_l = worker_layouts(sc, schedule)
        fleet.kv_link = sc.cluster.handoff_link(enc_l.stages[-1].first_device, dec_l.stages[0].first_device)
        fleet.kv_bytes_token = sc.model.kv_bytes_per_token_layer * sc.model.layers
        enc = _Costs(sc.timer(enc_l), 1, memo=_memo_of(sc, enc_l, 1, 1, False))
        dec = _Costs(
            sc.timer(dec_l),
            schedule.decode_microbatches,
            memo=_memo_of(sc, dec_l, schedule.decode_microbatches, 1, False),
        )
        fleet.workers = [_SimWorker(fleet, "encoder", schedule, enc) for _ in range(schedule.encoder_workers)] + [
            _SimWorker(fleet, "decoder", schedule, dec) for _ in range(schedule.decoder_workers)
        ]
        layout, slot = dec_l, stats.slot_tokens
    else:
        layout = worker_layouts(sc, schedule)[0]
        me = {"rra": schedule.encode_microbatches, "continuous": schedule.decode_microbatches}.get(schedule.policy, 1)
        fused = fused_steps(schedule)
        costs = _Costs(
            sc.timer(layout),
            schedule.decode_microbatches,
            me,
            fused=fused,
            memo=_memo_of(sc, layout, schedule.decode_microbatches, me, fused),
        )
        fleet.workers = [_SimWorker(fleet, "worker", schedule, costs) for _ in range(schedule.workers)]
        deliver_to(fleet)
        slot = stats.static_slot_tokens if schedule.policy == "static" else stats.slot_tokens
    _run(fleet)
    memory = float(memory_per_device(layout, sc.model, fleet.book.peak, slot))
    return _summary(fleet.book, stats, memory, sc.cluster.usable_memory_bytes)


def deliver_to(fleet: _Fleet) -> None:
    """The broker delivers to ``fleet``'s workers (replicas of one schedule) under their prefetch."""
    fleet.unacked = [0] * len(fleet.workers)
    fleet.book.delivering, fleet.book.delivered = True, [{} for _ in fleet.workers]
    for i, w in enumerate(fleet.workers):
        w.who = i


def _memo_of(
    sc: Scenario, layout: PipelineLayout, microbatches: int, encode_microbatches: int, fused: bool
) -> dict[tuple[object, ...], float]:
    """The step times already computed for ``sc`` on ``layout`` with these micro-batches."""
    return sc.memo(("step times", layout, microbatches, encode_microbatches, fused))


def replay(
    schedule: Schedule, requests: Sequence[SimRequest], durations_s: Iterable[float], *, role: Role = "worker"
) -> list[StepPlan]:
    """The StepPlans one worker takes when ``requests`` reach it at their ``arrival_s`` and its
    steps last ``durations_s`` (a real worker's recorded boundaries), in order: the simulator's
    driver and policy over a recorded time line instead of a cost model."""
    fleet = _Fleet(_Book(requests))
    times = iter(durations_s)
    worker = _SimWorker(fleet, role, schedule, None, step_s=lambda plan, shape: next(times))
    fleet.workers = [worker]
    if role == "worker":
        deliver_to(fleet)
    _run(fleet)
    return worker.plans


def worker_layouts(sc: Scenario, schedule: Schedule) -> tuple[PipelineLayout, ...]:
    """The pipeline one worker runs on: (encoder, decoder) under WAA, (worker,) otherwise.

    Replicas of a worker have the same layout (their devices differ, their times do not)."""
    k = schedule.tp_degree
    wd = schedule.worker_devices
    if schedule.split:
        e = wd or schedule.encoder_devices
        d = wd or schedule.decoder_devices
        if schedule.encoder_tp_stages < 0:  # every stage of both groups at degree k
            return (sc.layout(e, k, e // k), sc.layout(d, k, d // k, schedule.encoder_devices))
        return (
            sc.layout(e, k, schedule.encoder_tp_stages),
            sc.layout(d, k, schedule.tp_stages, schedule.encoder_devices),
        )
    return (sc.layout(wd or schedule.num_devices, k, schedule.tp_stages),)
