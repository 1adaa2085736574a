"""Loading the batch-job queue: submit N jobs at once, wait for every result, time the batch."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from common.jobs import JobProducer, collect_replies, job_id, new_batch_id
from common.messages.jobs import BatchJob
from common.messages.work import Sampling
from common.names import Names
from common.transport.batchdir import BatchDir
from common.transport.port import Bus
from loadgen.client import RequestSpec
from loadgen.metrics import Stat


@dataclass(frozen=True)
class BatchRunSummary:
    batch_id: str
    jobs: int
    completed: int
    failed: int  # failed or cancelled results
    missing: int  # no result before the timeout
    duplicate_replies: int
    submit_s: float  # publishing every job (confirmed)
    wall_s: float  # first publish to last result
    jobs_per_s: float  # completed jobs / wall_s
    output_tokens_per_s: float
    job_latency: Stat  # submission to result, per job


def jobs_from_specs(batch_id: str, specs: Sequence[RequestSpec], model: str, reply_to: str | None) -> list[BatchJob]:
    now = time.time()
    return [
        BatchJob(
            job_id(batch_id, i),
            model,
            "completion",
            s.prompt,
            (),
            Sampling(max_tokens=s.output_tokens, ignore_eos=True),
            reply_to,
            batch_id,
            now,
        )
        for i, s in enumerate(specs)
    ]


async def run_batch(
    bus: Bus,
    data: BatchDir,
    names: Names,
    specs: Sequence[RequestSpec],
    model: str,
    timeout_s: float,
    batch_id: str | None = None,
) -> BatchRunSummary:
    """Submit the specs as one batch with a reply queue, wait for every result (bounded)."""
    batch_id = batch_id or new_batch_id()
    reply = names.reply_queue(batch_id)
    jobs = jobs_from_specs(batch_id, specs, model, reply)
    producer = JobProducer(bus, data, names)
    start = time.perf_counter()
    start_wall = time.time()
    try:
        await producer.submit(batch_id, jobs, reply_to=reply)
        submitted = time.perf_counter()
        seen, duplicates = await collect_replies(bus, reply, {j.job_id for j in jobs}, timeout_s)
        wall = time.perf_counter() - start
    finally:
        await bus.delete(queues=[reply], exchanges=[])
    done = [r for r in seen.values() if r.status == "completed"]
    return BatchRunSummary(
        batch_id=batch_id,
        jobs=len(jobs),
        completed=len(done),
        failed=len(seen) - len(done),
        missing=len(jobs) - len(seen),
        duplicate_replies=duplicates,
        submit_s=submitted - start,
        wall_s=wall,
        jobs_per_s=len(done) / wall if wall > 0 else 0.0,
        output_tokens_per_s=sum(r.completion_tokens for r in done) / wall if wall > 0 else 0.0,
        job_latency=Stat.of([r.finished_at - start_wall for r in done]),
    )
