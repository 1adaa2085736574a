"""Batching policies as plain objects: state in, plan out.

The same objects decide batches in the mesh's workers (``services.worker.worker``, the engine as
executor) and in the simulator (``optimizer.simulator``, a cost model on a virtual clock): both run
them through ``optimizer.driver.Driver``, which repeats::

    plan = policy.next_step(state)        # WorkerState -> StepPlan, no I/O, no clock
    ... an executor runs plan.encode / plan.chunks / plan.admit / plan.decode (engine or cost model) ...
    policy.on_step_done(plan, finished)   # ids that finished during the step

``state.running`` holds the requests in this worker's decode batch that have not finished (the
engine drops finished requests at once: early termination). A policy keeps only the counters it
needs between steps (RRA: decode iterations since the last encode; static: its current batch),
and declares what its driver and worker must know of it (``Policy``: ``keeps_kv``, ``chunked``,
``batch_slots``).

Run-time adjustment (RRA and the WAA encoder, when the schedule carries its expectations): an
encode batch takes queued requests oldest first while their prompt tokens stay nearest to
``B_E x mean_input_len`` (short prompts: more requests, long ones: fewer; at least one, at most
2 x B_E and the free slots); and RRA moves its effective B_E by one, between 1 and 2 x B_E, at
each encode when its running decode batch (a moving average over decode steps) has drifted more
than 10 % from the ``mean_decode_batch`` the plan expects.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from optimizer.schedule import SPLIT_POLICIES, Schedule


@dataclass(frozen=True)
class QueuedRequest:
    request_id: str
    input_len: int
    arrival_s: float = 0.0
    max_len: int = 0  # the most KV positions it can reach: prompt + max_tokens (0: not known)


@dataclass(frozen=True)
class RunningRequest:
    request_id: str
    input_len: int
    generated: int  # tokens produced so far (prefill produces the first)
    max_len: int = 0  # as QueuedRequest's


@dataclass(frozen=True)
class PrefillingRequest:
    """A request whose prompt is being prefilled in chunks (mixed): ``prefilled`` of its
    ``input_len`` prompt tokens are in its KV cache; it holds a slot and has no token yet."""

    request_id: str
    input_len: int
    prefilled: int
    max_len: int = 0  # as QueuedRequest's


@dataclass(frozen=True)
class WorkerState:
    """What a worker knows at a batch boundary.

    ``queued``: the head of the waiting queue, oldest first (at least as many as the policy may
    take). ``incoming``: encoded requests handed off to this decoder, ready to merge (WAA).
    ``downstream_free``: decode slots reserved for this encoder's next batch (WAA credits; None
    when the worker decodes itself). ``prefilling``: requests part-way through a chunked prefill,
    oldest first.
    """

    queued: tuple[QueuedRequest, ...] = ()
    running: tuple[RunningRequest, ...] = ()
    incoming: tuple[RunningRequest, ...] = ()
    downstream_free: int | None = None
    prefilling: tuple[PrefillingRequest, ...] = ()


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens ``start .. start + length - 1`` of one request, prefilled in one step on top of
    the ``start`` already in its KV cache (``start == 0``: the request joins the worker). ``last``:
    the chunk ends the prompt, so the step gives the request its first token."""

    request_id: str
    start: int
    length: int
    last: bool


@dataclass(frozen=True)
class StepPlan:
    """One step: prefill ``encode``, merge ``admit`` (hand-offs), then advance ``decode`` by one
    token (``decode`` includes the admitted requests). ``padding`` counts slots computed without
    use (static batching keeps finished requests' slots until its batch ends). ``chunks``: parts
    of prompts prefilled in the same step (mixed; a request is in at most one of ``encode``,
    ``chunks`` and ``decode``)."""

    encode: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    admit: tuple[str, ...] = ()
    padding: int = 0
    chunks: tuple[PrefillChunk, ...] = ()

    @property
    def idle(self) -> bool:
        return not (self.encode or self.decode or self.admit or self.chunks)

    @property
    def first_tokens(self) -> tuple[str, ...]:
        """Requests this step gives their first token: the encoded ones and last chunks'."""
        return self.encode + tuple(c.request_id for c in self.chunks if c.last)

    @property
    def tokens(self) -> int:
        """Token rows of the step's decode and chunks (whole prompts not counted)."""
        return len(self.decode) + self.padding + sum(c.length for c in self.chunks)


IDLE = StepPlan()


class BatchingPolicy(Protocol):
    schedule: Schedule
    keeps_kv: bool
    chunked: bool

    @property
    def batch_slots(self) -> int: ...

    def next_step(self, state: WorkerState) -> StepPlan: ...

    def on_step_done(self, plan: StepPlan, finished: Sequence[str]) -> None: ...


class Policy:
    """What every policy declares about itself, with the values most have; the driver, the
    worker's intake and the simulator read these, never probe for them.

    ``keeps_kv``: what it prefills stays in this worker's cache (a WAA encoder's leaves with the
    hand-off, so only prompts count against its cache). ``chunked``: it plans the prefills under
    way itself (the driver finishes them, in whole, for the others). ``batch_slots``: slots a batch
    in progress holds, its finished members' included (a static batch: no room until it ends)."""

    keeps_kv = True
    chunked = False

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    @property
    def batch_slots(self) -> int:
        return 0

    def next_step(self, state: WorkerState) -> StepPlan:
        raise NotImplementedError

    def on_step_done(self, plan: StepPlan, finished: Sequence[str]) -> None:
        pass


def _ids(requests: Iterable[QueuedRequest | RunningRequest]) -> tuple[str, ...]:
    return tuple(r.request_id for r in requests)


DRIFT = 0.10  # relative drift of the decode batch that nudges B_E
AVERAGE_WEIGHT = 0.1  # weight of the newest decode step in the decode batch's moving average


class EncodeFill:
    """Chooses encode batches: B_E requests, or the run-time adjustment described above."""

    def __init__(self, schedule: Schedule, *, nudge: bool) -> None:
        self.schedule = schedule
        self.batch = float(schedule.encode_batch)  # effective B_E
        self.average: float | None = None  # moving average of the decode batch
        self._nudge = nudge and schedule.mean_decode_batch > 0

    def take(self, queued: Sequence[QueuedRequest], room: int) -> tuple[str, ...]:
        """Queued requests to encode now, oldest first, at most ``room``."""
        if self._nudge and self.average is not None:
            self._steer(self.average)
        target = self.schedule.mean_input_len * self.batch
        if target <= 0:
            return _ids(queued[: min(self.schedule.encode_batch, room)])
        limit = min(room, 2 * self.schedule.encode_batch)
        tokens = 0
        taken: list[str] = []
        for request in queued[:limit]:
            if taken and tokens + request.input_len / 2 > target:
                break
            tokens += request.input_len
            taken.append(request.request_id)
        return tuple(taken)

    def observe_decode(self, batch: int) -> None:
        a = self.average
        self.average = float(batch) if a is None else a + AVERAGE_WEIGHT * (batch - a)

    def _steer(self, seen: float) -> None:
        expected = self.schedule.mean_decode_batch
        top = 2 * self.schedule.encode_batch
        if seen < expected * (1 - DRIFT):
            self.batch = min(self.batch + 1, top)
        elif seen > expected * (1 + DRIFT):
            self.batch = max(self.batch - 1, 1)


class RraPolicy(Policy):
    """Round-robin allocation: encode up to B_E new requests (as many as slots freed), then
    N_D decode iterations over the whole running batch. Requests handed to this worker (left
    over from a WAA schedule) join the decode batch where slots are free."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.fill = EncodeFill(schedule, nudge=True)
        self._since_encode = schedule.decode_iters_per_encode  # encode first

    def next_step(self, state: WorkerState) -> StepPlan:
        free = self.schedule.decode_batch - len(state.running)
        due = self._since_encode >= self.schedule.decode_iters_per_encode or not state.running
        if due and state.queued and free > 0:
            return StepPlan(encode=self.fill.take(state.queued, free))
        return _decode_admitting(state, free)

    def on_step_done(self, plan: StepPlan, finished: Sequence[str]) -> None:
        if plan.decode:
            self.fill.observe_decode(len(plan.decode))
        self._since_encode = 0 if plan.encode else self._since_encode + bool(plan.decode)


def _decode_admitting(state: WorkerState, free: int) -> StepPlan:
    """Decode the running batch, merging handed-off requests into free slots."""
    admit = _ids(state.incoming[: max(free, 0)])
    batch = _ids(state.running) + admit
    return StepPlan(decode=batch, admit=admit) if batch else IDLE


class WaaEncoderPolicy(Policy):
    """WAA encoder: encode up to B_E queued requests while the decoders have room for them."""

    keeps_kv = False

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.fill = EncodeFill(schedule, nudge=False)  # the decode batch is the decoders'

    def next_step(self, state: WorkerState) -> StepPlan:
        room = 2 * self.schedule.encode_batch if state.downstream_free is None else state.downstream_free
        if room <= 0 or not state.queued:
            return IDLE
        return StepPlan(encode=self.fill.take(state.queued, room))


class WaaDecoderPolicy(Policy):
    """WAA decoder: merge handed-off requests up to B_D, then decode the running batch."""

    def next_step(self, state: WorkerState) -> StepPlan:
        return _decode_admitting(state, self.schedule.decode_batch - len(state.running))


class StaticPolicy(Policy):
    """FasterTransformer-like: take a batch of B_E, decode it until every member has finished;
    finished members keep their slots (padding) and nobody joins mid-batch."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self._size = 0
        self._live: set[str] = set()

    def next_step(self, state: WorkerState) -> StepPlan:
        if not self._live and state.running:  # a batch this policy did not start (a new schedule)
            self._size, self._live = len(state.running), set(_ids(state.running))
        if not self._live and state.incoming:  # handed-off requests form a batch of their own
            admit = _ids(state.incoming[: self.schedule.encode_batch])
            return StepPlan(decode=admit, admit=admit)
        if not self._live:
            take = state.queued[: self.schedule.encode_batch]
            return StepPlan(encode=_ids(take)) if take else IDLE
        decode = tuple(r.request_id for r in state.running if r.request_id in self._live)
        return StepPlan(decode=decode, padding=self._size - len(decode))

    def on_step_done(self, plan: StepPlan, finished: Sequence[str]) -> None:
        if plan.encode or plan.admit:
            started = plan.encode or plan.admit
            self._size, self._live = len(started), set(started)
        self._live.difference_update(finished)

    @property
    def batch_slots(self) -> int:
        """Slots the batch in progress holds, its finished members' included (0 between batches):
        a worker has no room for new requests until the batch ends."""
        return self._size if self._live else 0


class ContinuousPolicy(Policy):
    """Orca/vLLM-like iteration-level batching: every iteration admits queued requests into
    free slots (at most B_E prefills per iteration) and decodes the rest in the same step
    (handed-off requests, left over from a WAA schedule, take free slots first)."""

    def next_step(self, state: WorkerState) -> StepPlan:
        free = max(self.schedule.decode_batch - len(state.running), 0)
        admit = _ids(state.incoming[:free])
        take = state.queued[: min(free - len(admit), self.schedule.encode_batch)]
        plan = StepPlan(encode=_ids(take), decode=_ids(state.running) + admit, admit=admit)
        return IDLE if plan.idle else plan


class MixedPolicy(Policy):
    """Sarathi-style mixed steps: every step decodes the whole running batch and folds prompt
    chunks into the tokens left of ``chunk_tokens``: first the prefills under way (oldest first),
    then new requests while the running batch, the prefills under way and the new ones stay within
    ``decode_batch`` (at most ``encode_batch`` new ones a step). A prompt longer than what is left
    is cut; its rest comes in the next steps, and the step with its last chunk gives its first
    token. Handed-off requests take free slots first, as under continuous batching."""

    chunked = True

    def next_step(self, state: WorkerState) -> StepPlan:
        free = max(self.schedule.decode_batch - len(state.running) - len(state.prefilling), 0)
        admit = _ids(state.incoming[:free])
        decode = _ids(state.running) + admit
        budget = self.schedule.chunk_tokens - len(decode)
        chunks = []
        for under_way in state.prefilling:
            if budget <= 0:
                break
            chunks.append(_chunk(under_way.request_id, under_way.prefilled, under_way.input_len, budget))
            budget -= chunks[-1].length
        for request in state.queued[: min(free - len(admit), self.schedule.encode_batch)]:
            if budget <= 0:
                break
            chunks.append(_chunk(request.request_id, 0, request.input_len, budget))
            budget -= chunks[-1].length
        plan = StepPlan(decode=decode, admit=admit, chunks=tuple(chunks))
        return IDLE if plan.idle else plan


def _chunk(request_id: str, start: int, input_len: int, budget: int) -> PrefillChunk:
    """The next chunk of a prompt of ``input_len`` tokens from ``start``, at most ``budget``."""
    length = min(input_len - start, budget)
    return PrefillChunk(request_id, start, length, start + length >= input_len)


class DrainPolicy(Policy):
    """A worker leaving its role: decode what runs until it has finished; take nothing new."""

    def next_step(self, state: WorkerState) -> StepPlan:
        return StepPlan(decode=_ids(state.running)) if state.running else IDLE


class IdlePolicy(Policy):
    """A worker without a role (WAA, not yet allocated): nothing to run."""

    def next_step(self, state: WorkerState) -> StepPlan:
        return IDLE


Role = Literal["worker", "encoder", "decoder", "idle"]
ROLES: tuple[Role, ...] = ("worker", "encoder", "decoder", "idle")


def roles_of(schedule: Schedule) -> tuple[Role, ...]:
    """The roles workers take under ``schedule`` (besides idle)."""
    return ("encoder", "decoder") if schedule.split else ("worker",)


def intake_prefetch(policy: BatchingPolicy, running: int, held: int, decode_batch: int) -> int:
    """Requests a worker of role "worker" takes from the broker and holds unfinished (its
    consumer's prefetch), ``held`` of them already and ``running`` in its decode batch: what it
    could start at its next boundary, ``decode_batch``; but while a static batch holds its slots
    (its finished members' included) nothing more until the batch ends, so what it holds (at
    least one)."""
    if policy.batch_slots > running:
        return max(held, 1)
    return decode_batch


def fused_steps(schedule: Schedule) -> bool:
    """Whether a step that prefills and decodes runs as one forward pass over both (the engine
    batches prompt rows, chunks and decode rows together): always under the mixed policy, and
    under continuous batching unless its decode is split into pipeline micro-batches (then the
    prefill passes the pipeline on its own, stalling them: ``PipelineTimer.mixed_s``)."""
    return schedule.policy == "mixed" or (schedule.policy == "continuous" and schedule.decode_microbatches == 1)


def make_policy(schedule: Schedule, role: Role = "worker") -> BatchingPolicy:
    """The policy object a worker of ``role`` runs under ``schedule`` (WAA has two roles)."""
    if role == "idle":
        return IdlePolicy(schedule)
    if schedule.split:
        if role == "encoder":
            return WaaEncoderPolicy(schedule)
        if role == "decoder":
            return WaaDecoderPolicy(schedule)
        raise ValueError(f"{schedule.policy} workers are encoders or decoders, not {role!r}")
    if role != "worker":
        raise ValueError(f"{schedule.policy} has no {role!r} role; its workers do both")
    return WORKER_POLICIES[schedule.policy](schedule)


WORKER_POLICIES = {"rra": RraPolicy, "static": StaticPolicy, "continuous": ContinuousPolicy, "mixed": MixedPolicy}
# Every policy a worker can run (``make_policy`` builds it): the planner offers no other.
RUNNABLE_POLICIES: frozenset[str] = frozenset(WORKER_POLICIES) | frozenset(SPLIT_POLICIES)
