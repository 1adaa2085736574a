"""One driver for the simulator and the workers: the policy decides every step in both.

::

    plan = driver.plan()                  # policy.next_step(state of this worker)
    outcome = executor.run(plan)          # an engine (services) or a cost model (simulator)
    driver.complete(plan, outcome)        # bookkeeping, then policy.on_step_done

The driver holds what a worker knows between steps (its queue, its running batch, hand-offs
waiting to merge) and nothing else: no clock, no I/O. Only the executor differs between the
simulator (``optimizer.simulator``: profiled step times on a virtual clock) and a worker
(``services``: the real engine), so what is simulated is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import islice
from typing import Protocol

from optimizer.policies import (
    BatchingPolicy,
    PrefillChunk,
    PrefillingRequest,
    QueuedRequest,
    RunningRequest,
    StepPlan,
    WorkerState,
)


@dataclass(frozen=True)
class StepOutcome:
    """What a step did to its requests: ``finished`` ended (their last token came, or they were
    refused), ``departed`` left this worker unfinished (handed off to a decoder)."""

    finished: tuple[str, ...] = ()
    departed: tuple[str, ...] = ()


class StepExecutor(Protocol):
    def run(self, plan: StepPlan) -> StepOutcome: ...


def kv_positions(request: QueuedRequest | RunningRequest | PrefillingRequest, keeps_kv: bool = True) -> int:
    """The KV positions a request may come to hold: prompt + max_tokens where known (its prompt
    alone when the worker hands it off after prefill)."""
    if not keeps_kv:
        return request.input_len + 1
    now = request.input_len + getattr(request, "generated", 1)
    return max(request.max_len, now)


class Driver:
    """The state of one worker at its batch boundaries, and the policy deciding its steps.

    ``kv_tokens``: the KV cache's budget in token positions (None: no limit). The cache is dense,
    so a batch of B requests holds B x (the longest one's positions); a step admits or encodes a
    request only while the batch, each request counted at its most (``kv_positions``), fits. The
    requests are taken in the policy's order, and the first that does not fit stops the rest
    (a long request waits for room instead of being passed over for ever); what is not taken
    stays queued or incoming. A request in a chunked prefill holds its slot, counted at its most,
    from its first chunk on."""

    def __init__(self, policy: BatchingPolicy, *, kv_tokens: int | None = None) -> None:
        self.policy = policy
        self.kv_tokens = kv_tokens
        self.queued: dict[str, QueuedRequest] = {}  # arrival order
        self.running: dict[str, RunningRequest] = {}
        self.incoming: dict[str, RunningRequest] = {}  # handed off to this worker, not merged yet
        self.prefilling: dict[str, PrefillingRequest] = {}  # chunked prefill under way, oldest first
        self.downstream_free: int | None = None

    # --- what arrives and leaves between steps ------------------------------------------------
    def enqueue(self, request: QueuedRequest) -> None:
        self.queued[request.request_id] = request

    def offer(self, request: RunningRequest) -> None:
        """A request encoded elsewhere, ready to merge into this worker's batch."""
        self.incoming[request.request_id] = request

    def remove(self, request_id: str) -> bool:
        """Forget a request wherever it waits or runs (aborted, given back); True if it was here."""
        tables = (self.queued, self.running, self.incoming, self.prefilling)
        found = [table.pop(request_id, None) for table in tables]
        return any(r is not None for r in found)

    def switch(self, policy: BatchingPolicy) -> None:
        """A new schedule (or role) takes effect from the next step."""
        self.policy = policy

    @property
    def window(self) -> int:
        """Queued requests a policy may look at: an encode batch takes at most 2 x B_E."""
        return 2 * self.policy.schedule.encode_batch

    @property
    def empty(self) -> bool:
        return not (self.queued or self.running or self.incoming or self.prefilling)

    # --- one step ---------------------------------------------------------------------------
    def state(self) -> WorkerState:
        head = tuple(islice(self.queued.values(), self.window))
        return WorkerState(
            head,
            tuple(self.running.values()),
            tuple(self.incoming.values()),
            self.downstream_free,
            tuple(self.prefilling.values()),
        )

    def plan(self) -> StepPlan:
        plan = self._finish_prefills(self.policy.next_step(self.state()))
        return plan if self.kv_tokens is None else self._fit(plan)

    def _finish_prefills(self, plan: StepPlan) -> StepPlan:
        """Under a policy that does not chunk (a new schedule), prefills under way end in this step."""
        if not self.prefilling or self.policy.chunked:
            return plan
        rest = tuple(
            PrefillChunk(p.request_id, p.prefilled, p.input_len - p.prefilled, True) for p in self.prefilling.values()
        )
        return replace(plan, chunks=plan.chunks + rest)

    def fits_alone(self, request: QueuedRequest | RunningRequest) -> bool:
        """Whether ``request`` could ever run here (with nothing else in the cache)."""
        keeps = self.policy.keeps_kv or isinstance(request, RunningRequest)
        return self.kv_tokens is None or kv_positions(request, keeps) <= self.kv_tokens

    def _fit(self, plan: StepPlan) -> StepPlan:
        keeps = self.policy.keeps_kv
        under_way: list[RunningRequest | PrefillingRequest] = [*self.running.values(), *self.prefilling.values()]
        held = [kv_positions(r) for r in under_way]
        budget = self.kv_tokens
        assert budget is not None  # (plan() fits only under a budget)

        def take(candidates: list[QueuedRequest | RunningRequest], keep_kv: bool) -> tuple[str, ...]:
            taken = []
            for request in candidates:
                size = kv_positions(request, keep_kv)
                if (len(held) + 1) * max(held + [size]) > budget:
                    break
                held.append(size)
                taken.append(request.request_id)
            return tuple(taken)

        admit = take([self.incoming[r] for r in plan.admit], True)
        encode = take([self.queued[r] for r in plan.encode], keeps)
        starting = [c for c in plan.chunks if c.start == 0]
        started = set(take([self.queued[c.request_id] for c in starting], keeps))
        if len(admit) == len(plan.admit) and len(encode) == len(plan.encode) and len(started) == len(starting):
            return plan
        left_out = set(plan.admit) - set(admit)
        decode = tuple(r for r in plan.decode if r not in left_out)
        chunks = tuple(c for c in plan.chunks if c.start > 0 or c.request_id in started)
        if not (encode or decode or chunks) and self.running:  # nothing that fits: decode instead
            decode = tuple(self.running)
        return replace(plan, encode=encode, admit=admit, decode=decode, chunks=chunks)

    def complete(self, plan: StepPlan, outcome: StepOutcome) -> None:
        """Apply a step that ran: encoded requests run, chunks add to their prefills (a last chunk:
        the request runs), admitted ones merge, every decoded or encoded request has one more
        token; finished and departed requests leave."""
        for rid in plan.encode:
            queued = self.queued.pop(rid)
            self.running[rid] = RunningRequest(rid, queued.input_len, 1, queued.max_len)
        for chunk in plan.chunks:
            self._prefilled(chunk)
        for rid in plan.admit:
            self.running[rid] = self.incoming.pop(rid)
        for rid in plan.decode:
            self.running[rid] = replace(self.running[rid], generated=self.running[rid].generated + 1)
        for rid in (*outcome.finished, *outcome.departed):
            self.running.pop(rid, None)
            self.prefilling.pop(rid, None)
        self.policy.on_step_done(plan, outcome.finished)

    def _prefilled(self, chunk: PrefillChunk) -> None:
        rid = chunk.request_id
        if chunk.start == 0:
            q = self.queued.pop(rid)
            self.prefilling[rid] = PrefillingRequest(rid, q.input_len, 0, q.max_len)
        partial = self.prefilling[rid]
        if chunk.last:
            del self.prefilling[rid]
            self.running[rid] = RunningRequest(rid, partial.input_len, 1, partial.max_len)
        else:
            self.prefilling[rid] = replace(partial, prefilled=partial.prefilled + chunk.length)

    def step(self, executor: StepExecutor) -> StepPlan:
        """Plan and run one step through ``executor`` (idle plans are not run)."""
        plan = self.plan()
        if not plan.idle:
            self.complete(plan, executor.run(plan))
        return plan
