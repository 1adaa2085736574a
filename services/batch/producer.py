"""The job producer: publishes a batch of jobs, follows its progress, collects its results.

A batch is ``count`` jobs with ids ``{batch_id}-{index:06d}``; its record in the store (count,
model, reply queue, cancelled flag) lets any process ask for its status or cancel it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Sequence

from common.transport.port import Bus, Store
from services.batch import codec
from services.batch.messages import BatchJob, JobResult
from services.batch.names import RESULT_TTL_S, BatchNames


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


class JobProducer:
    def __init__(self, bus: Bus, store: Store, names: BatchNames) -> None:
        self.bus, self.store, self.names = bus, store, names

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
        await self.store.hset(self.names.job_batch(batch_id), {
            "count": str(len(jobs)), "model": jobs[0].model if jobs else "",
            "created_at": str(time.time()), "reply_to": reply_to or "",
        }, ttl_s=RESULT_TTL_S)
        for job in jobs:
            await self.bus.publish(self.names.jobs_queue, codec.encode(job))

    async def count(self, batch_id: str) -> int:
        meta = await self.store.hgetall(self.names.job_batch(batch_id))
        if "count" not in meta:
            raise UnknownBatch(batch_id)
        return int(meta["count"])

    async def results(self, batch_id: str) -> list[JobResult | None]:
        """Each job's stored result in job order (None while it has none)."""
        count = await self.count(batch_id)
        out: list[JobResult | None] = []
        for start in range(0, count, 32):  # bounded concurrency: the Redis pool is finite
            chunk = await asyncio.gather(*(
                self.store.get(self.names.job_result(job_id(batch_id, i)))
                for i in range(start, min(count, start + 32))))
            out.extend(codec.decode(raw, JobResult) if raw is not None else None for raw in chunk)
        return out

    async def status(self, batch_id: str) -> BatchStatus:
        meta = await self.store.hgetall(self.names.job_batch(batch_id))
        if "count" not in meta:
            raise UnknownBatch(batch_id)
        results = [r for r in await self.results(batch_id) if r is not None]
        by = {s: sum(1 for r in results if r.status == s) for s in ("completed", "failed", "cancelled")}
        return BatchStatus(batch_id, int(meta["count"]), by["completed"], by["failed"],
                           by["cancelled"], meta.get("cancelled") == "1")

    async def cancel(self, batch_id: str) -> None:
        """Jobs of the batch that have not started yet finish as ``cancelled``."""
        await self.count(batch_id)  # raises for an unknown batch
        await self.store.hset(self.names.job_batch(batch_id), {"cancelled": "1"}, ttl_s=RESULT_TTL_S)


async def collect_replies(bus: Bus, queue: str, expected: set[str], timeout_s: float,
                          prefetch: int = 256, stop_after: int | None = None,
                          ) -> tuple[dict[str, JobResult], int]:
    """Read JobResults from a reply queue until every expected job id arrived (or
    ``stop_after`` distinct ones did), or time runs out.

    Returns the first result seen per job id and the number of duplicate replies dropped.
    """
    seen: dict[str, JobResult] = {}
    duplicates = 0
    subscription = await bus.consume(queue, prefetch=prefetch)

    async def read() -> None:
        nonlocal duplicates
        async for delivery in subscription:
            result = codec.decode(delivery.body, JobResult)
            if result.job_id in seen:
                duplicates += 1
            else:
                seen[result.job_id] = result
            await delivery.ack()
            if expected <= seen.keys() or (stop_after is not None and len(seen) >= stop_after):
                return

    try:
        if expected:
            await asyncio.wait_for(read(), timeout=timeout_s)
    except TimeoutError:
        pass
    finally:
        await subscription.cancel()
    return seen, duplicates
