"""Gateway and batch producers -> workers, on the encode queue."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """How to decode one request (mirrors engine.api.SamplingParams)."""

    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class EncodeWork:
    """Encode one tokenized prompt and start generating; events go to ``reply_to``."""

    request_id: str
    model: str
    prompt_ids: tuple[int, ...]
    sampling: Sampling
    reply_to: str  # the submitter's events queue
    submitted_at: float  # unix seconds: arrival at the encode queue (kept when re-queued)
    stream: bool = True  # every token as it comes; False: decoders may send tokens in chunks
    resume_ids: tuple[int, ...] = ()  # tokens already delivered (a worker gave the request back)
    resume_text: str = ""  # the text those tokens released


WorkMessage = EncodeWork
