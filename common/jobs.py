"""The job queue's client side: publishes a batch of jobs, follows its progress, collects its results.

Any process that submits jobs uses it: ``exegpt batch``, the OpenAI Batch API
(``services.batch``) and the load generator's batch target. The consumer side, which runs the jobs
on the mesh's workers, is ``services.batch.consumer``.

A batch is ``count`` jobs with ids ``{batch_id}-{index:06d}``; its record, its cancellation and
its jobs' results are kept in the batch folder (``common.transport.batchdir``), which every process
that submits, runs or reads batches shares, so any of them can ask for its status or cancel it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from common.messages import codec
from common.messages.jobs import BatchJob, JobResult
from common.names import Names
from common.transport.batchdir import BatchDir
from common.transport.port import Bus

PUBLISH_WINDOW = 64  # publishes awaiting their broker confirm at once


def job_id(batch_id: str, index: int) -> str:
    return f"{batch_id}-{index:06d}"


def new_batch_id() -> str:
    return "b" + uuid.uuid4().hex[:16]


@dataclass(frozen=True)
class BatchStatus:
    batch_id: str
    count: int
    completed: int
    failed: int
    cancelled: int
    cancel_requested: bool

    @property
    def finished(self) -> int:
        return self.completed + self.failed + self.cancelled

    @property
    def done(self) -> bool:
        return self.finished >= self.count


class UnknownBatch(KeyError):
    pass


class BatchStateLost(KeyError):
    """Something of the batch is kept (results of its jobs, its cancellation, an index entry) but
    not its record: it existed, and what it was has been lost."""

    def __init__(self, batch_id: str, results_kept: int) -> None:
        super().__init__(batch_id)
        self.batch_id, self.results_kept = batch_id, results_kept

    def __str__(self) -> str:
        return (
            f"the record of batch {self.batch_id} was lost (the batch folder does not hold it; "
            f"{self.results_kept} job results are kept); its state cannot be told: submit it again"
        )


class JobProducer:
    """Batches on the jobs queue; their records and results are kept in a ``BatchDir``."""

    def __init__(self, bus: Bus, data: BatchDir, names: Names) -> None:
        self.bus, self.data, self.names = bus, data, names

    async def submit(self, batch_id: str, jobs: Sequence[BatchJob], *, reply_to: str | None) -> None:
        """Record the batch, then publish its jobs (confirmed, persistent) to the jobs queue.

        The jobs' ids must be ``job_id(batch_id, i)`` for i in 0..len-1. Submitting the same batch
        again is harmless: the consumers store one result per job id.
        """
        for i, job in enumerate(jobs):
            if job.job_id != job_id(batch_id, i) or job.batch_id != batch_id:
                raise ValueError(f"job {i} of batch {batch_id} has id {job.job_id!r}")
        await self.bus.declare_queue(self.names.jobs_queue)
        if reply_to is not None:
            await self.bus.declare_queue(reply_to)
        await self.data.put_record(
            batch_id,
            "batch.json",
            {
                "count": len(jobs),
                "model": jobs[0].model if jobs else "",
                "created_at": time.time(),
                "reply_to": reply_to or "",
            },
        )
        for start in range(0, len(jobs), PUBLISH_WINDOW):  # confirms overlap within a window
            await asyncio.gather(
                *(
                    self.bus.publish(self.names.jobs_queue, codec.encode(job))
                    for job in jobs[start : start + PUBLISH_WINDOW]
                )
            )

    async def count(self, batch_id: str) -> int:
        record = await self.data.record(batch_id, "batch.json")
        if record is None:
            if await self.data.known(batch_id):
                raise BatchStateLost(batch_id, len(await self.data.results(batch_id)))
            raise UnknownBatch(batch_id)
        return int(record["count"])

    async def results(self, batch_id: str) -> list[JobResult | None]:
        """Each job's stored result in job order (None while it has none)."""
        count = await self.count(batch_id)
        stored = await self.data.results(batch_id)
        return [
            codec.decode(stored[job_id(batch_id, i)], JobResult) if job_id(batch_id, i) in stored else None
            for i in range(count)
        ]

    async def status(self, batch_id: str) -> BatchStatus:
        count = await self.count(batch_id)
        results = [r for r in await self.results(batch_id) if r is not None]
        by = {s: sum(1 for r in results if r.status == s) for s in ("completed", "failed", "cancelled")}
        return BatchStatus(
            batch_id, count, by["completed"], by["failed"], by["cancelled"], await self.data.cancelled(batch_id)
        )

    async def cancel(self, batch_id: str) -> None:
        """Jobs of the batch that have not started yet finish as ``cancelled``."""
        await self.count(batch_id)  # raises for an unknown batch
        await self.data.cancel(batch_id)


class ReplyCollector:
    """Reads JobResults off a reply queue in the background, keeping the first per job id.

    Replies are at least once (a consumer that dies between replying and recording it replies
    again after redelivery): duplicates are counted and dropped here.
    """

    def __init__(self, bus: Bus, queue: str, prefetch: int = 256) -> None:
        self.bus, self.queue, self.prefetch = bus, queue, prefetch
        self.seen: dict[str, JobResult] = {}
        self.duplicates = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> ReplyCollector:
        subscription = await self.bus.consume(self.queue, prefetch=self.prefetch)
        self._task = asyncio.create_task(self._read(subscription))
        self._subscription = subscription
        return self

    async def _read(self, subscription: Any) -> None:
        async for delivery in subscription:
            try:
                result = codec.decode(delivery.body, JobResult)
            except Exception as exc:  # one bad reply never stops the collector
                await delivery.dead_letter(f"undecodable: {exc}")
                continue
            if result.job_id in self.seen:
                self.duplicates += 1
            else:
                self.seen[result.job_id] = result
            await delivery.ack()
            self._changed.set()

    async def wait_for(self, done: Callable[[dict[str, JobResult]], bool], timeout_s: float) -> bool:
        """Wait until ``done(seen)`` holds; False if the time ran out first."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not done(self.seen):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return False
        return True

    async def stop(self) -> None:
        await self._subscription.cancel()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


async def collect_replies(
    bus: Bus, queue: str, expected: set[str], timeout_s: float, prefetch: int = 256
) -> tuple[dict[str, JobResult], int]:
    """Read replies until every expected job id arrived or time runs out: (first result per
    job id, duplicate replies dropped)."""
    collector = await ReplyCollector(bus, queue, prefetch).start()
    try:
        await collector.wait_for(lambda seen: expected <= seen.keys(), timeout_s)
    finally:
        await collector.stop()
    return collector.seen, collector.duplicates
