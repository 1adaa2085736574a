"""The encoder service: prefill batches of up to B_E requests and hand each one to the decoders.

Main loop, one iteration per encode batch::

    receive (up to B_E work messages) → schedule (apply a new version) → execute (prefill, export)
      → emit (store KV, publish hand-offs and first tokens) → ack

A work message is acked only after its hand-off is stored and published (or its request finished),
so an encoder that dies mid-batch has its batch redelivered to another.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from common.config import MeshConfig
from common.lifecycle import Stage
from common.messages import codec
from common.messages.events import Failure, Token
from common.messages.handoff import KvReady
from common.messages.status import LengthSample
from common.messages.work import EncodeWork, Sampling, WorkMessage
from common.names import DONE_TTL_S, OUTPUT_LENGTHS_MAX
from common.transport.connect import Transports
from common.transport.port import Delivery
from engine.api import GenerationRequest, KVHandoff, SamplingParams, TokenEvent
from services.engines import EngineRunner
from services.worker import Outbox, WorkerBase


@dataclass
class Job:
    """One work message being encoded."""

    delivery: Delivery
    work: EncodeWork
    first: TokenEvent | None = None
    handoff: KVHandoff | None = None
    error: str | None = None
    started_at: float = 0.0


def params_of(sampling: Sampling) -> SamplingParams:
    return SamplingParams(sampling.max_tokens, sampling.temperature, sampling.top_k,
                          sampling.top_p, sampling.seed, sampling.stop, sampling.ignore_eos)


def request_of(work: EncodeWork) -> GenerationRequest:
    return GenerationRequest(work.request_id, work.prompt_ids, params_of(work.sampling))


def token_of(event: TokenEvent) -> Token:
    return Token(event.request_id, event.index, event.token_id, event.text, event.finished,
                 event.finish_reason)


class EncoderService(WorkerBase):
    role = "encoder"

    def __init__(self, config: MeshConfig, transports: Transports, runner: EngineRunner) -> None:
        super().__init__(config, transports)
        self.runner = runner
        self.batches = 0

    async def start(self) -> None:
        await self.bus.declare_queue(self.names.handoff_queue)
        await self.start_common(self.names.encode_queue, prefetch=self.config.prefetch_count)

    @property
    def batch_limit(self) -> int:
        return min(self.follower.schedule.encode_batch, self.config.max_encode_batch)

    async def run(self) -> None:
        """Encode until stopped, then give back what was received but not started."""
        await self.start()
        while not self.stopping.is_set():
            deliveries = await self.receive()
            await self.apply_schedule()
            jobs = await self.admit(deliveries)
            if jobs and await self.execute(jobs):
                await self.emit(jobs)
        await self.report("stopping")
        await self.stop_consuming()
        await self.close()

    async def receive(self) -> list[Delivery]:
        return await self.inbox.wait(self.batch_limit)

    async def admit(self, deliveries: list[Delivery]) -> list[Job]:
        """Decode work; dead-letter what cannot be read, skip what was aborted or already done."""
        jobs = []
        for delivery in deliveries:
            try:
                jobs.append(Job(delivery, codec.decode(delivery.body, WorkMessage)))
            except codec.DecodeError:
                await delivery.reject(requeue=False)
        jobs = await self._refuse_other_models(jobs)
        done = await self._already_done(jobs)
        for job, skip in zip(jobs, done):
            if skip or job.work.request_id in self.aborted:
                await job.delivery.ack()
        return [j for j, skip in zip(jobs, done) if not skip and j.work.request_id not in self.aborted]

    async def _refuse_other_models(self, jobs: list[Job]) -> list[Job]:
        """Work for a model this encoder does not run fails with a 400 (a misconfigured mesh)."""
        outbox, kept = Outbox(), []
        for job in jobs:
            if job.work.model == self.config.model:
                kept.append(job)
            else:
                message = f"this mesh serves {self.config.model!r}, not {job.work.model!r}"
                outbox.failure(job.work.reply_to, Failure(job.work.request_id, 400, message))
        await self.send(outbox, batch_size=len(jobs))
        for job in jobs:
            if job not in kept:
                await job.delivery.ack()
        return kept

    async def _already_done(self, jobs: list[Job]) -> list[bool]:
        """Per job, whether its request finished already. Only a redelivered message can be work
        already done (decoders dedupe the rest), so only those are looked up, in one round trip."""
        again = [j for j in jobs if j.delivery.redelivered]
        markers = await self.store.get_many(*(self.names.done(j.work.request_id) for j in again))
        finished = {j.work.request_id for j, m in zip(again, markers) if m is not None}
        return [j.work.request_id in finished for j in jobs]

    async def execute(self, jobs: list[Job]) -> bool:
        """Prefill and export the batch; False when the engine failed and the work was given back."""
        try:
            await self._prefill_and_export(jobs)
        except Exception as exc:  # an engine fault: retry elsewhere once, then give up
            await self.give_back(jobs, exc)
            return False
        return True

    async def _prefill_and_export(self, jobs: list[Job]) -> None:
        """Prefill the batch (one by one if a prompt is refused) and export the unfinished ones."""
        for job in jobs:
            job.started_at = time.time()
        try:
            results = await self.runner.call(self._encode, [request_of(j.work) for j in jobs])
        except ValueError:
            results = [await self._prefill_alone(job) for job in jobs]
        for job, (first, handoff) in zip(jobs, results):
            job.first, job.handoff = first, handoff
        self.batches += 1

    def _encode(self, requests: list[GenerationRequest]) -> list[tuple[TokenEvent, KVHandoff | None]]:
        """On the engine thread, in one call: prefill, then export every request still running.

        ValueError only when the engine refused a prompt (then nothing was admitted).
        """
        engine = self.runner.engine
        firsts = engine.prefill(requests)
        try:
            return [(first, None if first.finished else engine.export_request(first.request_id))
                    for first in firsts]
        except ValueError as exc:  # not a refused prompt: an engine fault, given back as such
            raise RuntimeError(f"export failed: {exc}") from exc

    async def give_back(self, jobs: list[Job], exc: Exception) -> None:
        """Requeue a failed batch once; a batch that fails again is dead-lettered and reported."""
        outbox = Outbox()
        for job in jobs:
            await self.runner.call(self.runner.engine.abort, job.work.request_id)
            if job.delivery.redelivered:
                outbox.failure(job.work.reply_to, Failure(job.work.request_id, 500, f"encode failed: {exc}"))
        await self.send(outbox, batch_size=len(jobs))
        for job in jobs:
            await job.delivery.reject(requeue=not job.delivery.redelivered)

    async def _prefill_alone(self, job: Job) -> tuple[TokenEvent | None, KVHandoff | None]:
        try:
            return (await self.runner.call(self._encode, [request_of(job.work)]))[0]
        except ValueError as exc:
            job.error = str(exc)
            return None, None

    async def emit(self, jobs: list[Job]) -> None:
        """Hand-offs to the decoders, first tokens and stamps to the submitters, then acks.

        Streaming requests' first tokens go out at once (their time to first token is the
        client's); the others' wait until the hand-offs are published, so that the submitter's
        handling of them does not compete with the hand-off for the CPU."""
        handed = [asyncio.create_task(self._hand_off_or_finish(job)) for job in jobs]
        now, later = Outbox(), Outbox()
        for job in jobs:
            self._record(now if job.work.stream else later, job)
        published = self.send_soon(now, batch_size=len(jobs))
        await asyncio.gather(*handed)
        await asyncio.gather(*published, *self.send_soon(later, batch_size=len(jobs)))
        await asyncio.gather(*(job.delivery.ack() for job in jobs))

    def _record(self, outbox: Outbox, job: Job) -> None:
        reply_to, rid = job.work.reply_to, job.work.request_id
        outbox.stamp(reply_to, rid, Stage.ENCODE_START, job.started_at)
        outbox.stamp(reply_to, rid, Stage.ENCODE_END)
        if job.error is not None:
            outbox.failure(reply_to, Failure(rid, 400, job.error))
        elif job.first is not None:
            outbox.token(reply_to, token_of(job.first))
            if job.handoff is not None:
                outbox.stamp(reply_to, rid, Stage.HANDED_OFF)

    async def _hand_off_or_finish(self, job: Job) -> None:
        if job.handoff is not None:
            ref = await self.kv.put(job.handoff, producer=self.worker_id, ttl_s=self.config.kv_ttl_s)
            ready = KvReady(job.work.request_id, self.worker_id, job.work.reply_to, ref,
                            len(job.work.prompt_ids), self.follower.version, job.work.submitted_at,
                            job.work.stream)
            await self.bus.publish(self.names.handoff_queue, codec.encode(ready))
        elif job.first is not None:
            await self._finish(job)

    async def _finish(self, job: Job) -> None:
        """Finished at prefill (one token, EOS or stop): mark done, record its lengths."""
        rid = job.work.request_id
        sample = LengthSample(rid, len(job.work.prompt_ids), 1, job.first.finish_reason or "stop",
                              time.time())
        await self.store.set_once_and_record(self.names.done(rid), b"1", ttl_s=DONE_TTL_S,
                                             list_key=self.names.output_lengths,
                                             item=codec.encode(sample), max_len=OUTPUT_LENGTHS_MAX)

