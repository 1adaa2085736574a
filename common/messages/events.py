"""Workers -> the submitter's events queue: tokens, lifecycle stamps and failures, batched."""

from __future__ import annotations

from dataclasses import dataclass

from common.lifecycle import Stage


@dataclass(frozen=True)
class Token:
    request_id: str
    index: int  # 0 for the prefill token; the submitter dedupes on (request_id, index)
    token_id: int
    text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprob: float | None = None  # when the request asked for logprobs
    top_logprobs: tuple[TopLogprob, ...] = ()  # likeliest first


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class Stamp:
    request_id: str
    stage: Stage
    at: float  # unix seconds


@dataclass(frozen=True)
class Failure:
    request_id: str
    status: int  # HTTP-like: 400 for bad input found by a worker, 500 for an engine error
    message: str


@dataclass(frozen=True)
class EventBatch:
    """What one worker iteration produced for one submitter."""

    producer: str
    role: str  # "encoder" | "decoder"
    schedule_version: int
    batch_size: int  # requests in the iteration that produced these events
    tokens: tuple[Token, ...] = ()
    stamps: tuple[Stamp, ...] = ()
    failures: tuple[Failure, ...] = ()


EventMessage = EventBatch
