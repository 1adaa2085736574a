"""What runs one job: the executor port, and an executor without a model (for queue tests).

A job consumer hands each job to an ``Executor`` and gets its output back. ``JobFailed`` means
the job itself is bad (an empty or too long prompt): the job gets a failed result and is not
retried. Any other exception is the infrastructure's and the job is retried. Jobs that need a
model run through the mesh's workers (``services.batch.mesh_executor``), like every request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from common.messages.jobs import BatchJob
from engine.api import SamplingParams, Tokenizer
from services.hosting.sampling import engine_sampling


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
        raise JobFailed(
            f"prompt ({len(ids)} tokens) plus max_tokens ({job.sampling.max_tokens}) "
            f"exceeds the model's context of {max_context} tokens"
        )
    return ids


def sampling_params(job: BatchJob) -> SamplingParams:
    try:
        return engine_sampling(job.sampling)
    except ValueError as exc:
        raise JobFailed(str(exc)) from None


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
