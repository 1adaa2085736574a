"""Batching policies as plain objects: state in, plan out.

The same objects decide batches in the mesh's workers and in the simulator. A driver (worker
loop or simulator) repeats::

    plan = policy.next_step(state)        # WorkerState -> StepPlan, no I/O, no clock
    ... run plan.encode / plan.admit / plan.decode on the engine (or cost it) ...
    policy.on_step_done(plan, finished)   # ids that finished during the step

``state.running`` holds the requests in this worker's decode batch that have not finished (the
engine drops finished requests at once: early termination). A policy keeps only the counters it
needs between steps (RRA: decode iterations since the last encode; static: its current batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

from optimizer.schedule import Schedule


@dataclass(frozen=True)
class QueuedRequest:
    request_id: str
    input_len: int
    arrival_s: float = 0.0


@dataclass(frozen=True)
class RunningRequest:
    request_id: str
    input_len: int
    generated: int  # tokens produced so far (prefill produces the first)


@dataclass(frozen=True)
class WorkerState:
    """What a worker knows at a batch boundary.

    ``queued``: the head of the waiting queue, oldest first (at least as many as the policy may
    take). ``incoming``: encoded requests handed off to this decoder, ready to merge (WAA).
    ``downstream_free``: free decode slots the decoders report to an encoder (WAA; None when the
    worker decodes itself).
    """

    queued: tuple[QueuedRequest, ...] = ()
    running: tuple[RunningRequest, ...] = ()
    incoming: tuple[RunningRequest, ...] = ()
    downstream_free: int | None = None


@dataclass(frozen=True)
class StepPlan:
    """One step: prefill ``encode``, merge ``admit`` (hand-offs), then advance ``decode`` by one
    token. ``padding`` counts slots computed without use (static batching keeps finished
    requests' slots until its batch ends)."""

    encode: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    admit: tuple[str, ...] = ()
    padding: int = 0

    @property
    def idle(self) -> bool:
        return not (self.encode or self.decode or self.admit)


IDLE = StepPlan()


class BatchingPolicy(Protocol):
    schedule: Schedule

    def next_step(self, state: WorkerState) -> StepPlan: ...

    def on_step_done(self, plan: StepPlan, finished: Sequence[str]) -> None: ...


def _ids(requests) -> tuple[str, ...]:
    return tuple(r.request_id for r in requests)


class RraPolicy:
    """Round-robin allocation: encode up to B_E new requests (as many as slots freed), then
    N_D decode iterations over the whole running batch."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self._since_encode = schedule.decode_iters_per_encode  # encode first

    def next_step(self, state: WorkerState) -> StepPlan:
        free = self.schedule.decode_batch - len(state.running)
        due = self._since_encode >= self.schedule.decode_iters_per_encode or not state.running
        if due and state.queued and free > 0:
            return StepPlan(encode=_ids(state.queued[: min(self.schedule.encode_batch, free)]))
        return StepPlan(decode=_ids(state.running)) if state.running else IDLE

    def on_step_done(self, plan: StepPlan, finished: Sequence[str]) -> None:
        self._since_encode = 0 if plan.encode else self._since_encode + bool(plan.decode)


class WaaEncoderPolicy:
    """WAA encoder: encode up to B_E queued requests while the decoders have room for them."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def next_step(self, state: WorkerState) -> StepPlan:
        room = self.schedule.encode_batch if state.downstream_free is None else state.downstream_free
        take = min(self.schedule.encode_batch, room)
        return StepPlan(encode=_ids(state.queued[:take])) if take > 0 and state.queued else IDLE

    def on_step_done(self, plan: StepPlan, finished: Sequence[str]) -> None:
        pass


class WaaDecoderPolicy:
    """WAA decoder: merge handed-off requests up to B_D, then decode the running batch."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def next_step(self, state: WorkerState) -> StepPlan:
        admit = state.incoming[: max(self.schedule.decode_batch - len(state.running), 0)]
        batch = _ids(state.running) + _ids(admit)
        return StepPlan(decode=batch, admit=_ids(admit)) if batch else IDLE

    def on_step_done(self, plan: StepPlan, finished: Sequence[str]) -> None:
        pass


class StaticPolicy:
    """FasterTransformer-like: take a batch of B_E, decode it until every member has finished;
    finished members keep their slots (padding) and nobody joins mid-batch."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self._size = 0
        self._live: set[str] = set()

    def next_step(self, state: WorkerState) -> StepPlan:
        if not self._live:
            take = state.queued[: self.schedule.encode_batch]
            return StepPlan(encode=_ids(take)) if take else IDLE
        decode = tuple(r.request_id for r in state.running if r.request_id in self._live)
        return StepPlan(decode=decode, padding=self._size - len(decode))

    def on_step_done(self, plan: StepPlan, finished: Sequence[str]) -> None:
        if plan.encode:
            self._size, self._live = len(plan.encode), set(plan.encode)
        self._live.difference_update(finished)


class ContinuousPolicy:
    """Orca/vLLM-like iteration-level batching: every iteration admits queued requests into
    free slots (at most B_E prefills per iteration) and decodes the rest in the same step."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def next_step(self, state: WorkerState) -> StepPlan:
        free = max(self.schedule.decode_batch - len(state.running), 0)
        take = state.queued[: min(free, self.schedule.encode_batch)]
        plan = StepPlan(encode=_ids(take), decode=_ids(state.running))
        return IDLE if plan.idle else plan

    def on_step_done(self, plan: StepPlan, finished: Sequence[str]) -> None:
        pass


Role = Literal["worker", "encoder", "decoder"]


def make_policy(schedule: Schedule, role: Role = "worker") -> BatchingPolicy:
    """The policy object a worker of ``role`` runs under ``schedule`` (WAA has two roles)."""
    if schedule.policy in ("waa-c", "waa-m"):
        if role == "encoder":
            return WaaEncoderPolicy(schedule)
        if role == "decoder":
            return WaaDecoderPolicy(schedule)
        raise ValueError(f"{schedule.policy} workers are encoders or decoders, not {role!r}")
    if role != "worker":
        raise ValueError(f"{schedule.policy} has no {role!r} role; its workers do both")
    return {"rra": RraPolicy, "static": StaticPolicy, "continuous": ContinuousPolicy}[schedule.policy](schedule)
