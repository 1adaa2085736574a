"""The requests a worker holds: where each came from, what it produced, what is still unsent.

A request comes as work (``EncodeWork`` from the encode queue: a worker or an encoder prefills
it) or as a hand-off (``KvReady`` from the hand-off queue: a decoder imports it). Its delivery
stays unacked while the request is this worker's, so a worker that dies loses nothing: the
broker gives the message to another worker, which runs the request again (the submitter keeps
each token index once).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from common.messages.events import Token, TopLogprob
from common.messages.handoff import KvReady
from common.messages.work import EncodeWork
from common.transport.port import Delivery, deadline_of
from engine.api import GenerationRequest, KVHandoff, SamplingParams, TokenEvent
from services.hosting.sampling import wire_sampling

CHUNK_TOKENS = 64  # a non-streaming request's tokens go out at least this often


def token_of(event: TokenEvent) -> Token:
    top = tuple(TopLogprob(token, logprob) for token, logprob in event.top_logprobs)
    return Token(
        event.request_id,
        event.index,
        event.token_id,
        event.text,
        event.finished,
        event.finish_reason,
        event.logprob,
        top,
    )


@dataclass
class Held:
    """One request this worker holds (queued, handed to it, or running)."""

    delivery: Delivery  # acked when the request leaves this worker (finished, handed off, re-queued)
    request_id: str
    reply_to: str
    stream: bool
    submitted_at: float
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    work: EncodeWork | None = None  # came as work
    ready: KvReady | None = None  # came as a hand-off
    handoff: KVHandoff | None = None  # its KV cache, until imported
    generated: list[int] = field(default_factory=list)  # every token id so far (resumed ones too)
    emitted: str = ""  # text released so far
    unsent: list[Token] = field(default_factory=list)
    sent: list[asyncio.Task[None]] = field(default_factory=list)  # publishes its ack waits for
    encode_start_at: float = 0.0
    first_token_at: float = 0.0
    trace: Any = None  # tracing on: the context its next span continues from (common.tracing)
    decode_span: Any = None  # tracing on: open from its decode start until it leaves this worker
    deadline: float | None = None  # epoch seconds its client waits until (from its message; None: none)
    credit: bool = False  # holds a decode credit (an encoder took one to encode it; a decoder's hand-off)

    @staticmethod
    def from_work(delivery: Delivery, work: EncodeWork, params: SamplingParams) -> Held:
        """``params``: the work's sampling as the engine takes it (``services.hosting.sampling``)."""
        return Held(
            delivery,
            work.request_id,
            work.reply_to,
            work.stream,
            work.submitted_at,
            work.prompt_ids,
            params,
            work=work,
            generated=list(work.resume_ids),
            emitted=work.resume_text,
            deadline=deadline_of(delivery.headers),
        )

    @staticmethod
    def from_handoff(delivery: Delivery, ready: KvReady, handoff: KVHandoff) -> Held:
        return Held(
            delivery,
            ready.request_id,
            ready.reply_to,
            ready.stream,
            ready.submitted_at,
            handoff.prompt_ids,
            handoff.params,
            ready=ready,
            handoff=handoff,
            generated=list(handoff.generated_ids),
            emitted=handoff.emitted_text,
            deadline=deadline_of(delivery.headers),
        )

    @property
    def input_len(self) -> int:
        """Tokens a prefill of this request runs through the model."""
        return len(self.prompt_ids) + (len(self.work.resume_ids) if self.work else 0)

    def generation_request(self) -> GenerationRequest:
        resume = self.work.resume_ids if self.work else ()
        text = self.work.resume_text if self.work else ""
        return GenerationRequest(self.request_id, self.prompt_ids, self.params, resume, text)

    def continuation(self, model: str) -> EncodeWork:
        """Work that continues this request elsewhere from the tokens already delivered."""
        return EncodeWork(
            self.request_id,
            model,
            self.prompt_ids,
            wire_sampling(self.params),
            self.reply_to,
            self.submitted_at,
            self.stream,
            tuple(self.generated),
            self.emitted,
        )

    def record(self, event: TokenEvent) -> list[Token]:
        """Keep a new token; return the tokens due to go out now (all when streaming, else in
        chunks and at the end)."""
        self.generated.append(event.token_id)
        self.emitted += event.text
        self.unsent.append(token_of(event))
        if self.stream or event.finished or len(self.unsent) >= CHUNK_TOKENS:
            due, self.unsent = self.unsent, []
            return due
        return []

    def flush(self) -> list[Token]:
        due, self.unsent = self.unsent, []
        return due
