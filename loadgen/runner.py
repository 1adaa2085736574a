"""Running a workload against a send function: open loop (arrival times) or closed loop.

The runner owns the clock (seconds from the start of the run) and the bounds: it stops after the
last request or after ``max_duration_s``, whichever comes first. Requests still in flight at the
deadline are cancelled and recorded as ``aborted``; requests not yet sent are counted as not sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from loadgen.client import RequestSpec
from loadgen.metrics import RequestRecord

Clock = Callable[[], float]
SendFn = Callable[[RequestSpec], Awaitable[RequestRecord]]


@dataclass(frozen=True)
class Workload:
    """What to send: the requests, and either their send offsets or a closed-loop concurrency."""

    specs: tuple[RequestSpec, ...]
    offsets_s: np.ndarray | None = None  # open loop: one send time per request
    concurrency: int | None = None  # closed loop: this many requests always in flight

    def __post_init__(self) -> None:
        if (self.offsets_s is None) == (self.concurrency is None):
            raise ValueError("a workload is either open loop (offsets) or closed loop (concurrency)")
        if self.offsets_s is not None and len(self.offsets_s) != len(self.specs):
            raise ValueError("one offset per request")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")


@dataclass(frozen=True)
class RunOutcome:
    records: tuple[RequestRecord, ...]  # sent requests, by index
    not_sent: int  # requests the deadline stopped before they were sent
    hit_deadline: bool


class _Run:
    def __init__(self, send: SendFn, clock: Clock, on_record: Callable[[RequestRecord], None]):
        self.send, self.clock, self.on_record = send, clock, on_record
        self.records: list[RequestRecord] = []
        self.inflight: dict[int, tuple[RequestSpec, float]] = {}

    async def one(self, spec: RequestSpec) -> None:
        sent = self.clock()
        self.inflight[spec.index] = (spec, sent)
        try:
            record = await self.send(spec)
        except Exception as exc:  # a client bug must not take the whole run down
            record = RequestRecord(
                spec.index,
                sent,
                self.clock(),
                spec.input_tokens,
                0,
                (),
                f"client_{type(exc).__name__}",
                str(exc)[:500] or None,
            )
        del self.inflight[spec.index]
        self.records.append(record)
        self.on_record(record)

    def abort_inflight(self) -> None:
        now = self.clock()
        for spec, sent in self.inflight.values():
            record = RequestRecord(spec.index, sent, now, spec.input_tokens, 0, (), "aborted")
            self.records.append(record)
            self.on_record(record)
        self.inflight.clear()


async def _open_loop(run: _Run, specs: Sequence[RequestSpec], offsets: np.ndarray) -> None:
    async with asyncio.TaskGroup() as group:
        for spec, offset in zip(specs, offsets):
            delay = float(offset) - run.clock()
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival process itself, not a synchronisation
            group.create_task(run.one(spec))


async def _closed_loop(run: _Run, specs: Sequence[RequestSpec], concurrency: int) -> None:
    pending = iter(specs)

    async def worker() -> None:
        for spec in pending:  # the iterator is shared: each spec goes to exactly one worker
            await run.one(spec)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, len(specs))):
            group.create_task(worker())


def relative_clock() -> Clock:
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


async def run_workload(
    workload: Workload,
    send: SendFn,
    clock: Clock,
    max_duration_s: float,
    on_record: Callable[[RequestRecord], None] = lambda r: None,
) -> RunOutcome:
    if not max_duration_s > 0:
        raise ValueError(f"max_duration_s must be > 0, got {max_duration_s}")
    run = _Run(send, clock, on_record)
    if workload.offsets_s is not None:
        body = _open_loop(run, workload.specs, workload.offsets_s)
    else:
        assert workload.concurrency is not None
        body = _closed_loop(run, workload.specs, workload.concurrency)
    hit_deadline = False
    try:
        await asyncio.wait_for(body, timeout=max_duration_s)
    except TimeoutError:
        hit_deadline = True
        run.abort_inflight()
    records = tuple(sorted(run.records, key=lambda r: r.index))
    return RunOutcome(records, len(workload.specs) - len(records), hit_deadline)
