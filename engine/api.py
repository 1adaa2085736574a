"""The engine's contract with the rest of the system.

Every worker (encoder, decoder, the embedded server, benchmarks) talks to an engine through these
types only. The engine keeps a *running batch*: requests join it with ``step(prefill=...)`` (or by
importing a hand-off) at any iteration and leave it as soon as they finish (early termination;
their KV slots are compacted away). One ``step`` is one scheduling step of a batching policy
(``optimizer.policies.StepPlan``): new requests prefilled, some running ones decoded by one token,
padding rows paid for, in one forward pass; ``prefill`` and ``decode_step`` are its two plain cases.

Lifecycle of one request inside one engine::

    step(prefill=[req]) ──► running ──step(decode=[id, ...])*──► finished (removed, event.finished=True)
                               │
                               └─ export_request(id) ──► KVHandoff ──► other_engine.import_request(h)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, Protocol

import msgpack

if TYPE_CHECKING:
    import numpy as np

FinishReason = Literal["stop", "length", "abort"]


class EngineBroken(RuntimeError):
    """The engine cannot run another step (a process of its worker group died). What it held is
    lost: the service running it must stop, so that its requests are redelivered elsewhere."""


class RequestRejected(ValueError):
    """One request of a step cannot run (its prompt, its sampling parameters, its id): the step
    changed nothing, and runs without it. ``request_id`` names the request at fault."""

    def __init__(self, request_id: str, reason: str) -> None:
        super().__init__(f"request {request_id!r}: {reason}")
        self.request_id, self.reason = request_id, reason


MAX_LOGPROBS = 20  # the most top log-probabilities a token reports (as OpenAI's API allows)
MAX_TEMPERATURE = 2.0  # as OpenAI's API allows
MAX_TOP_K = 1 << 20  # above any vocabulary: a larger top_k cuts nothing more
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_STOPS, MAX_STOP_CHARS = 8, 256  # stop strings one request may give, and the length of each


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` means greedy."""

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

    def __post_init__(self) -> None:
        if (problem := sampling_problem(self)) is not None:
            raise ValueError(problem)

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


def sampling_problem(p: SamplingParams) -> str | None:
    """What is wrong with ``p`` (the first field out of its bounds, or not a finite number), or
    None. Checked when the parameters are built and again by the engine before a request joins
    a batch: no value reaches the sampler that it cannot sample with."""
    problems = (
        _integer_problem("max_tokens", p.max_tokens, 1),
        _number_problem("temperature", p.temperature, 0.0, MAX_TEMPERATURE),
        _integer_problem("top_k", p.top_k, 0, MAX_TOP_K),
        _number_problem("top_p", p.top_p, 0.0, 1.0, open_low=True),
        _number_problem("presence_penalty", p.presence_penalty, -2.0, 2.0),
        _number_problem("frequency_penalty", p.frequency_penalty, -2.0, 2.0),
        _integer_problem("min_tokens", p.min_tokens, 0),
        None if p.seed is None else _integer_problem("seed", p.seed, *SEED_RANGE),
        None if p.logprobs is None else _integer_problem("logprobs", p.logprobs, 0, MAX_LOGPROBS),
        _stop_problem(p.stop),
    )
    return next((problem for problem in problems if problem is not None), None)


def _integer_problem(name: str, value: object, low: int, high: int | None = None) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} must be an integer, got {value!r}"
    if high is None:
        return f"{name} must be >= {low}, got {value}" if value < low else None
    return f"{name} must be in [{low}, {high}], got {value}" if not low <= value <= high else None


def _stop_problem(stop: object) -> str | None:
    """Stop strings are checked after every token: a few, each short."""
    if not isinstance(stop, tuple) or not all(isinstance(s, str) for s in stop):
        return f"stop must be a tuple of strings, got {stop!r}"[:200]
    if len(stop) > MAX_STOPS:
        return f"stop may hold at most {MAX_STOPS} strings, got {len(stop)}"
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        return f"each stop string may be at most {MAX_STOP_CHARS} characters, got {max(map(len, stop))}"
    return None


def _number_problem(name: str, value: object, low: float, high: float, *, open_low: bool = False) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{name} must be a finite number, got {value!r}"
    if value < low or (open_low and value == low) or value > high:
        return f"{name} must be in {'(' if open_low else '['}{low:g}, {high:g}], got {value!r}"
    return None


@dataclass(frozen=True)
class GenerationRequest:
    """A request to prefill. ``resume_ids``: tokens it already generated and delivered (a worker gave
    it back, e.g. when changing role); the engine runs prompt + resume_ids through the model and
    continues from there: the first new event has ``index == len(resume_ids)``, and ``max_tokens`` and
    the context limit count the resumed tokens. ``resume_text``: the text those tokens released to
    the client (for stop-string handling). A greedy request continues exactly as an uninterrupted
    run would; a sampled one restarts its generator (its seed), so its continuation differs."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    resume_ids: tuple[int, ...] = ()
    resume_text: str = ""


@dataclass(frozen=True)
class PromptChunk:
    """Tokens ``start .. start + length - 1`` of ``request``'s prompt (with its resumed tokens) for
    a chunked prefill: the chunk at ``start == 0`` adds the request to the engine, each next one
    continues where the last stopped, and the one that reaches the end gives the first token."""

    request: GenerationRequest
    start: int
    length: int


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request, as produced by ``step`` (or ``prefill``, ``decode_step``)."""

    request_id: str
    token_id: int
    index: int  # 0 for the token produced by prefill (len(resume_ids) for a resumed request), then +1
    text: str  # text this token adds after stop-string handling ("" while a stop string may be forming)
    finished: bool
    finish_reason: FinishReason | None = None
    logprob: float | None = None  # of this token, when the request asked for logprobs
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), likeliest first


HANDOFF_VERSION = 1  # of KVHandoff.to_bytes's map


@dataclass(frozen=True)
class KVHandoff:
    """A running request moved between engines: its KV cache as bytes plus what decoding needs.

    ``kv`` holds the request's cache laid out as ``shape`` in ``dtype`` (for an encoder-decoder
    model, self- and cross-attention caches; ``layout`` says how to read it). Importing it into an
    engine of the same model continues to exactly the tokens the exporting engine would produce.
    """

    request_id: str
    model: str
    params: SamplingParams
    prompt_ids: tuple[int, ...]
    generated_ids: tuple[int, ...]
    emitted_text: str  # text already returned to the client (for stop-string handling)
    rng_state: bytes  # sampler state, so sampled continuations match too
    dtype: str  # e.g. "float32", "bfloat16"
    shape: tuple[int, ...]
    layout: str  # e.g. "llama:L,2,Hkv,T,D" or "t5:self+cross"
    kv: bytes | np.ndarray[Any, Any]  # or a writable buffer (a NIXL read's array), which the import reads in place

    def to_bytes(self) -> bytes:
        """The hand-off on the wire: a versioned msgpack map, the KV bytes as a binary field."""
        p = self.params
        data: bytes = msgpack.packb(
            {
                "v": HANDOFF_VERSION,
                "request_id": self.request_id,
                "model": self.model,
                "params": {**{f.name: getattr(p, f.name) for f in fields(SamplingParams)}, "stop": list(p.stop)},
                "prompt_ids": list(self.prompt_ids),
                "generated_ids": list(self.generated_ids),
                "emitted_text": self.emitted_text,
                "rng_state": self.rng_state,
                "dtype": self.dtype,
                "shape": list(self.shape),
                "layout": self.layout,
                "kv": self.kv,
            },
            use_bin_type=True,
        )
        return data

    @staticmethod
    def from_bytes(data: bytes) -> KVHandoff:
        """A hand-off read back from ``to_bytes``; ValueError for anything else."""
        try:
            m = msgpack.unpackb(data, raw=False)
        except (msgpack.UnpackException, ValueError) as exc:
            raise ValueError(f"not a KV hand-off: {exc}") from exc
        if not isinstance(m, dict) or m.get("v") != HANDOFF_VERSION:
            raise ValueError(f"unsupported KV hand-off version {m.get('v') if isinstance(m, dict) else None!r}")
        try:
            p = m["params"]
            known = {f.name for f in fields(SamplingParams)}  # a field this version lacks keeps its default
            params = SamplingParams(**{**{k: v for k, v in p.items() if k in known}, "stop": tuple(p["stop"])})
            return KVHandoff(
                request_id=m["request_id"],
                model=m["model"],
                params=params,
                prompt_ids=tuple(m["prompt_ids"]),
                generated_ids=tuple(m["generated_ids"]),
                emitted_text=m["emitted_text"],
                rng_state=m["rng_state"],
                dtype=m["dtype"],
                shape=tuple(m["shape"]),
                layout=m["layout"],
                kv=m["kv"],
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed KV hand-off: {exc!r}") from exc


class Tokenizer(Protocol):
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        """OpenAI-style ``[{"role": ..., "content": ...}]`` to the model's prompt text."""
        ...


class Engine(Protocol):
    model_name: str
    tokenizer: Tokenizer
    max_context: int  # prompt + generated tokens one request may hold
    device: str  # "cpu" or "cuda"

    def step(
        self,
        prefill: Sequence[GenerationRequest] = (),
        decode: Sequence[str] = (),
        padding: int = 0,
        chunks: Sequence[PromptChunk] = (),
    ) -> list[TokenEvent]:
        """One scheduling step in one forward pass (T5: the encoder's over the new prompts, then one
        decoder pass); returns the events of the new and decoded requests (in any order: map them
        by ``request_id``).

        - ``prefill``: new requests join the running batch, each producing its first token (a
          resumed request: its next one). Decoder-only models run their packed prompt tokens
          through the same projections and MLPs as the decode rows; T5 encodes them, then takes
          one decoder pass with the decode rows.
        - ``decode``: running requests advanced by one token. Running requests not named are
          untouched (cache, tokens, sampler), so micro-batches and "encode while the batch waits"
          are steps that name some of them, or none.
        - ``padding``: extra decode rows computed and thrown away (static batching's finished
          slots): they cost what a decode row at the batch's longest context costs and change no
          request.
        - ``chunks``: prompt chunks (chunked prefill, decoder-only models): a request in a chunked
          prefill holds its KV but is not running (no token, not decodable) until its last
          chunk, which gives its first token. Greedy tokens are those of a whole prefill.

        A greedy request's tokens do not depend on what shares its step. Requests that finish
        (max_tokens, EOS, stop, context) leave the batch at once. Raises ValueError, changing
        nothing, for a prompt that is empty, too long for ``max_context`` (prompt + resumed tokens
        for decoder-only models), holds a token outside the vocabulary or resumes from
        ``max_tokens`` tokens or more; sampling parameters out of their bounds
        (``sampling_problem``); an id already running or repeated (each of these a
        ``RequestRejected`` naming the request); a ``decode`` id that is not running, is repeated
        or is also in ``prefill``; ``padding < 0``.

        Transactional: a step that raises leaves the running batch as it was (the same requests
        with the same caches, tokens and samplers; only their slot order may differ); a new
        request joins only once its whole step succeeded (``EngineBroken`` aside).
        """
        ...

    def prefill(self, requests: Sequence[GenerationRequest]) -> list[TokenEvent]:
        """``step(prefill=requests)``: add the requests to the running batch, return each first token.

        A request whose first token already finishes it (max_tokens == 1, EOS, stop) is not kept.
        """
        ...

    def decode_step(self) -> list[TokenEvent]:
        """``step(decode=running())``: one decode iteration over every running request."""
        ...

    def running(self) -> list[str]:
        """Request ids in the running batch, in slot order."""
        ...

    def abort(self, request_id: str) -> None:
        """Drop a running request now (client went away); unknown ids are ignored."""
        ...

    def export_request(self, request_id: str, into: Callable[[int], Any] | None = None) -> KVHandoff:
        """Remove a running request from this engine and return it as a hand-off. ``into(nbytes)``
        may give a writable buffer of ``nbytes`` (a transport's registered memory) that the KV
        cache is copied into once and handed off as; None (or no ``into``): the KV as bytes."""
        ...

    def import_request(self, handoff: KVHandoff) -> None:
        """Add a handed-off request to the running batch; the next step that decodes it continues it."""
        ...
