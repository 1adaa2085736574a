"""Batch job messages: producers -> job consumers on the jobs queue, consumers -> reply queues.

Encoded by ``common.messages.codec`` like every other message; batch tags live in their own
range (200+).
A ``BatchJob`` is idempotent by ``job_id``: however often it is delivered, one ``JobResult`` is
stored under that id, and the first one stored is the one every reader sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.messages.work import Sampling

JobKind = Literal["completion", "chat"]
JobStatus = Literal["completed", "failed", "cancelled"]


@dataclass(frozen=True)
class ChatTurn:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class BatchJob:
    """One completion or chat request to run offline."""

    job_id: str  # idempotency key: unique per job, stable across redeliveries and resubmissions
    model: str
    kind: str  # JobKind
    prompt: str  # completion prompt ("" for chat)
    messages: tuple[ChatTurn, ...]  # chat turns (() for a completion)
    sampling: Sampling
    reply_to: str | None  # durable queue that receives the JobResult, if any
    batch_id: str | None  # the group the job belongs to (cancellation, status)
    submitted_at: float  # unix seconds


@dataclass(frozen=True)
class JobResult:
    job_id: str
    batch_id: str | None
    status: str  # JobStatus
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    error: str | None  # why a job failed or was cancelled
    worker: str  # which consumer produced it
    redelivered: bool  # the broker had delivered this job before (a consumer died or gave up)
    started_at: float
    finished_at: float
