"""The job consumer: takes jobs off the durable jobs queue, runs them, stores each result once.

One job, from delivery to ack::

    deliver ─► decode ─(bad bytes)─► dead queue ("undecodable: ...")
                 │
                 ▼
         result stored? ──yes──────────────────────────┐
                 │ no                                   │
                 ▼                                      │
         batch cancelled? ─yes─► cancelled result ─┐    │
                 │ no                              │    │
                 ▼                                 ▼    ▼
         wait for a turn (yield to interactive) ► run ► store result (set-if-absent: first wins)
                                                        │
                                         reply_to and not yet replied? ─► publish, mark replied
                                                        │
                                                        ▼
                                                       ack

The ack comes last, so a consumer that dies at any point leaves the job unacked and the broker
delivers it again; the set-if-absent store makes the stored result unique whatever happens.
A job's deliveries are counted (``Delivery.attempts``): an internal error sends it back, a counted
attempt; at its last attempt the job is stored (and replied) as failed, and if even that fails the
message goes to the dead queue with the reason. A delivery past the limit (its consumers died
with it) is dead-lettered by the subscription, and the job is stored as failed first.
A reply is at least once: a consumer dying between publishing it and marking it sent leads to a
second copy with the same ``job_id`` (readers drop duplicates by id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.messages import codec
from common.messages.jobs import BatchJob, JobResult
from common.names import Names
from common.transport.batchdir import BatchDir
from common.transport.port import Bus, Delivery, Unroutable, failed, failure_reason
from services.batch.executor import Executor, JobFailed, JobOutput

log = logging.getLogger(__name__)


class Admission:
    """Decides when a job may start; the default never waits."""

    async def wait_turn(self) -> None:
        return None


@dataclass
class QueueDepthAdmission(Admission):
    """Batch work yields to interactive work: a job starts only while the interactive queue (the
    encoders' work queue) holds at most ``max_depth`` messages besides this consumer's own.

    ``own_waiting`` counts this consumer's requests still in that queue. To keep batch work from
    starving, a job waits at most ``max_wait_s`` and then starts anyway.
    """

    bus: Bus
    queue: str
    max_depth: int = 0
    poll_s: float = 0.05
    max_wait_s: float = 30.0
    own_waiting: Callable[[], int] = lambda: 0
    waited_s: float = field(default=0.0, init=False)  # total time jobs spent yielding
    _depth: tuple[float, int] = field(default=(float("-inf"), 0), init=False)  # (read at, depth)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    async def wait_turn(self) -> None:
        start = time.monotonic()
        while time.monotonic() - start < self.max_wait_s:
            if await self._queue_depth() - self.own_waiting() <= self.max_depth:
                break
            await asyncio.sleep(self.poll_s)  # a control loop polling the broker, bounded above
        self.waited_s += time.monotonic() - start

    async def _queue_depth(self) -> int:
        """The queue's depth, asked of the broker at most once per ``poll_s`` for all waiters."""
        async with self._lock:
            read_at, depth = self._depth
            if time.monotonic() - read_at >= self.poll_s:
                depth = await self.bus.queue_depth(self.queue)
                self._depth = (time.monotonic(), depth)
            return depth


@dataclass(frozen=True)
class ConsumerConfig:
    worker_id: str
    max_inflight: int = 16  # jobs one consumer runs at once (its prefetch)
    drain_timeout_s: float = 30.0  # on stop, how long running jobs may finish


@dataclass
class ConsumerStats:
    stored: int = 0  # results this consumer stored first
    duplicates: int = 0  # deliveries whose result was already stored (redeliveries)
    replies: int = 0
    dead: int = 0  # messages sent to the dead queue (undecodable, or failing at their last attempt)


class JobConsumer:
    def __init__(
        self,
        bus: Bus,
        data: BatchDir,
        names: Names,
        executor: Executor,
        config: ConsumerConfig,
        admission: Admission | None = None,
        on_handled: Callable[[JobResult, bool], None] | None = None,
    ) -> None:
        self.bus, self.data, self.names = bus, data, names
        self.executor, self.config = executor, config
        self.admission = admission or Admission()
        self.on_handled = on_handled  # called after each ack: (result, stored by this delivery)
        self.stats = ConsumerStats()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; then stop taking jobs and let running ones finish."""
        await self.bus.declare_queue(self.names.jobs_queue)
        subscription = await self.bus.consume(
            self.names.jobs_queue, prefetch=self.config.max_inflight, on_dead=self._on_dead
        )
        running: set[asyncio.Task[None]] = set()

        async def stop_when_asked() -> None:
            await stop.wait()
            await subscription.cancel()  # not-yet-handed-out jobs go back to the queue

        stopper = asyncio.create_task(stop_when_asked())
        try:
            async for delivery in subscription:
                task = asyncio.create_task(self.handle(delivery))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            stopper.cancel()
            if running:
                _, late = await asyncio.wait(running, timeout=self.config.drain_timeout_s)
                for task in late:  # unacked: the broker redelivers them to another consumer
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)

    async def handle(self, delivery: Delivery) -> None:
        """One job under the per-message guard: whatever it raises, the consumer goes on."""
        try:
            job = codec.decode(delivery.body, BatchJob)
        except Exception as exc:  # DecodeError, or anything a malformed message raises
            self.stats.dead += 1
            await delivery.dead_letter(f"undecodable: {exc}")
            return
        try:
            result, stored = await self._result_for(job, delivery)
            await self._reply(job, result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("job %s: attempt %d of %d failed", job.job_id, delivery.attempts, delivery.limit)
            try:
                if await failed(delivery, exc, self._on_dead):  # back to the queue, or (last) the dead queue
                    self.stats.dead += 1
            except Exception:
                log.exception("job %s: could not be settled; the broker redelivers it", job.job_id)
            return
        await delivery.ack()
        if self.on_handled is not None:
            self.on_handled(result, stored)

    async def _on_dead(self, delivery: Delivery, reason: str) -> None:
        """A job going to the dead queue: stored (and replied) as failed with the reason, unless
        a result exists already."""
        job = codec.decode(delivery.body, BatchJob)
        now = time.time()
        result = JobResult(
            job_id=job.job_id,
            batch_id=job.batch_id,
            status="failed",
            text="",
            finish_reason=None,
            prompt_tokens=0,
            completion_tokens=0,
            error=f"moved to the dead queue: {reason}",
            worker=self.config.worker_id,
            redelivered=delivery.redelivered,
            started_at=now,
            finished_at=now,
        )
        if await self.data.put_result(job.batch_id, job.job_id, codec.encode(result)):
            self.stats.stored += 1
        stored = await self.data.result(job.batch_id, job.job_id)
        await self._reply(job, codec.decode(stored, JobResult) if stored is not None else result)

    async def _result_for(self, job: BatchJob, delivery: Delivery) -> tuple[JobResult, bool]:
        """The job's result, and whether this call stored it (False: it existed already)."""
        existing = await self.data.result(job.batch_id, job.job_id)
        if existing is not None:
            self.stats.duplicates += 1
            return codec.decode(existing, JobResult), False
        result = await self._run(job, delivery)
        if await self.data.put_result(job.batch_id, job.job_id, codec.encode(result)):
            self.stats.stored += 1
            return result, True
        self.stats.duplicates += 1  # another consumer stored it while this one ran it
        stored = await self.data.result(job.batch_id, job.job_id)
        return (codec.decode(stored, JobResult) if stored is not None else result), False

    async def _run(self, job: BatchJob, delivery: Delivery) -> JobResult:
        started = time.time()
        redelivered = delivery.redelivered

        def result(status: str, out: JobOutput | None, error: str | None) -> JobResult:
            return JobResult(
                job_id=job.job_id,
                batch_id=job.batch_id,
                status=status,
                text=out.text if out else "",
                finish_reason=out.finish_reason if out else None,
                prompt_tokens=out.prompt_tokens if out else 0,
                completion_tokens=out.completion_tokens if out else 0,
                error=error,
                worker=self.config.worker_id,
                redelivered=redelivered,
                started_at=started,
                finished_at=time.time(),
            )

        if await self.data.cancelled(job.batch_id):
            return result("cancelled", None, "the batch was cancelled before this job ran")
        await self.admission.wait_turn()
        try:
            return result("completed", await self.executor.execute(job), None)
        except JobFailed as exc:
            return result("failed", None, str(exc))
        except Exception as exc:
            if delivery.attempts < delivery.limit:
                raise  # retried on another delivery (a counted attempt)
            return result(
                "failed",
                None,
                f"internal error at attempt {delivery.attempts} of {delivery.limit}: {failure_reason(exc)}",
            )

    async def _reply(self, job: BatchJob, result: JobResult) -> None:
        if job.reply_to is None:
            return
        if await self.data.replied(job.batch_id, job.job_id):
            return
        with contextlib.suppress(Unroutable):  # the reply queue is gone; the result is stored
            await self.bus.publish(job.reply_to, codec.encode(result))
            self.stats.replies += 1
        await self.data.mark_replied(job.batch_id, job.job_id)
