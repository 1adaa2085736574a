"""Gateway and batch producers -> workers, on the encode queue."""

from __future__ import annotations

from dataclasses import dataclass

from engine.api import SamplingParams as Sampling  # one definition: the engine's, on the wire as is

__all__ = ["EncodeWork", "Sampling"]


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
