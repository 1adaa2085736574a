"""Gateway and batch producers -> workers, on the encode queue."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EncodeWork", "Sampling"]


@dataclass(frozen=True)
class Sampling:
    """How one request is decoded, as the mesh carries it. ``temperature == 0`` means greedy.

    Plain data: the engine checks the values when a worker turns them into its own parameters
    (``services.hosting.sampling``), and the front ends check them the same way before sending."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None  # per-request generator seed; None: derived from the request id
    stop: tuple[str, ...] = ()  # stop strings; the matched string is not part of the output
    ignore_eos: bool = False  # forced-length mode: decode exactly max_tokens, EOS ignored
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the k likeliest
    min_tokens: int = 0  # end-of-sequence tokens cannot be chosen before this many are generated


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
