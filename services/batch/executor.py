"""What runs one job: the executor port, and an executor over an in-process engine.

A job consumer hands each job to an ``Executor`` and gets its output back. ``JobFailed`` means
the job itself is bad (an empty or too long prompt): the job gets a failed result and is not
retried. Any other exception is the infrastructure's and the job is retried.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Protocol

from engine.api import Engine, GenerationRequest, SamplingParams, TokenEvent, Tokenizer
from common.messages.jobs import BatchJob


@dataclass(frozen=True)
class JobOutput:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class JobFailed(Exception):
    """The job cannot run as given; its message goes into the job's failed result."""


class Executor(Protocol):
    async def execute(self, job: BatchJob) -> JobOutput: ...


def prompt_ids(job: BatchJob, tokenizer: Tokenizer, max_context: int) -> tuple[int, ...]:
    """Tokenize a job's prompt (chat turns through the chat template); JobFailed if it cannot run."""
    if job.kind == "chat":
        if not job.messages:
            raise JobFailed("a chat job needs at least one message")
        text = tokenizer.apply_chat_template([{"role": t.role, "content": t.content} for t in job.messages])
    else:
        text = job.prompt
    ids = tuple(tokenizer.encode(text))
    if not ids:
        raise JobFailed("the prompt is empty")
    if len(ids) + job.sampling.max_tokens > max_context:
        raise JobFailed(f"prompt ({len(ids)} tokens) plus max_tokens ({job.sampling.max_tokens}) "
                        f"exceeds the model's context of {max_context} tokens")
    return ids


def sampling_params(job: BatchJob) -> SamplingParams:
    s = job.sampling
    try:
        return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k,
                              top_p=s.top_p, seed=s.seed, stop=s.stop, ignore_eos=s.ignore_eos)
    except ValueError as exc:
        raise JobFailed(str(exc)) from None


@dataclass
class _Pending:
    prompt_tokens: int
    future: asyncio.Future[JobOutput]
    text: str = ""
    tokens: int = 0


class EngineExecutor:
    """Runs jobs on an engine in this process with iteration-level batching.

    Jobs that arrive join the running batch at the next iteration (one prefill of everything
    waiting, up to ``max_batch`` running), and leave it when they finish. Engine calls run in a
    worker thread, one at a time, so the event loop keeps consuming and acking.
    """

    def __init__(self, engine: Engine, max_batch: int = 32) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._waiting: list[GenerationRequest] = []
        self._pending: dict[str, _Pending] = {}
        self._aborts: list[str] = []  # applied between engine calls, never during one
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    async def execute(self, job: BatchJob) -> JobOutput:
        ids = prompt_ids(job, self._engine.tokenizer, self._engine.max_context)
        request = GenerationRequest(f"{job.job_id}#{uuid.uuid4().hex[:8]}", ids, sampling_params(job))
        future: asyncio.Future[JobOutput] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = _Pending(len(ids), future)
        self._waiting.append(request)
        self._wake.set()
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._run())
        try:
            return await future
        finally:
            if not future.done():  # the consumer gave up on the job: free its slot
                self._pending.pop(request.request_id, None)
                self._waiting = [r for r in self._waiting if r.request_id != request.request_id]
                self._aborts.append(request.request_id)

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            if not self._waiting and not self._engine.running():
                self._wake.clear()
                await self._wake.wait()
            for request_id in self._aborts:
                self._engine.abort(request_id)
            self._aborts.clear()
            events = await self._step()
            self._apply(events)

    async def _step(self) -> list[TokenEvent]:
        room = self._max_batch - len(self._engine.running())
        if self._waiting and room > 0:
            batch, self._waiting = self._waiting[:room], self._waiting[room:]
            try:
                return await asyncio.to_thread(self._engine.prefill, batch)
            except ValueError as exc:  # validated before, so an engine limit we did not know
                for request in batch:
                    self._fail(request.request_id, JobFailed(str(exc)))
                return []
        return await asyncio.to_thread(self._engine.decode_step)

    def _apply(self, events: list[TokenEvent]) -> None:
        for event in events:
            pending = self._pending.get(event.request_id)
            if pending is None:
                continue
            pending.text += event.text
            pending.tokens += 1
            if event.finished:
                del self._pending[event.request_id]
                if not pending.future.done():
                    pending.future.set_result(JobOutput(pending.text, event.finish_reason,
                                                        pending.prompt_tokens, pending.tokens))

    def _fail(self, request_id: str, exc: Exception) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(exc)


class EchoExecutor:
    """No model: answers each job with the first ``max_tokens`` words of its prompt.

    For testing and timing the queue itself (delivery, storage, replies) without an engine.
    ``delay_s`` stands in for the time a model would take per job.
    """

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    async def execute(self, job: BatchJob) -> JobOutput:
        text = job.prompt if job.kind == "completion" else " ".join(t.content for t in job.messages)
        words = text.split()
        if not words:
            raise JobFailed("the prompt is empty")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # simulated model time
        out = words[: job.sampling.max_tokens]
        reason = "length" if len(out) == job.sampling.max_tokens else "stop"
        return JobOutput(" " + " ".join(out), reason, len(words), len(out))
