"""A deterministic stand-in for the engine (a test double of engine.api.Engine).

Tokens are bytes: the tokenizer maps characters to ids 1..255 and back; generation is a pure
function of the previous token and the position, so a request continued on another engine after a
hand-off produces the same tokens. Used by unit and service tests, and by subprocess tests through
the model spec ``tests.mesh.fake_engine:load``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.api import GenerationRequest, KVHandoff, PromptChunk, TokenEvent

EOS = 0
MAX_CONTEXT = 256


class ByteTokenizer:
    eos_token_id = EOS

    def encode(self, text: str) -> list[int]:
        return [max(1, b) for b in text.encode("latin-1", "replace")]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids if i != EOS)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def next_token(previous: int, index: int) -> int:
    return 97 + (previous * 7 + index) % 26  # 'a'..'z'


@dataclass
class _Running:
    request: GenerationRequest
    generated: list[int] = field(default_factory=list)


class FakeEngine:
    model_name = "fake"
    max_context = MAX_CONTEXT
    device = "cpu"

    def __init__(self) -> None:
        self.tokenizer = ByteTokenizer()
        self.batch: dict[str, _Running] = {}
        self.prefill_sizes: list[int] = []
        self.steps: list[tuple[int, int, int]] = []  # (prefilled, decoded, padding) per step
        self.prefilled: dict[str, int] = {}  # a chunked prompt's tokens taken so far

    def step(
        self,
        prefill: Sequence[GenerationRequest] = (),
        decode: Sequence[str] = (),
        padding: int = 0,
        chunks: Sequence[PromptChunk] = (),
    ) -> list[TokenEvent]:
        self._validate(prefill, decode, padding)
        self._validate_chunks(chunks)
        if prefill:
            self.prefill_sizes.append(len(prefill))
        self.steps.append((len(prefill), len(decode), padding))
        events = [self._advance(rid, self.batch[rid].generated[-1]) for rid in decode]
        for r in prefill:
            self.batch[r.request_id] = _Running(r, list(r.resume_ids))
            events.append(self._advance(r.request_id, (r.prompt_ids + r.resume_ids)[-1]))
        for chunk in chunks:  # a prompt in pieces: the last piece gives the first token
            r = chunk.request
            whole = r.prompt_ids + r.resume_ids
            self.prefilled[r.request_id] = chunk.start + chunk.length
            if chunk.start + chunk.length == len(whole):
                del self.prefilled[r.request_id]
                self.batch[r.request_id] = _Running(r, list(r.resume_ids))
                events.append(self._advance(r.request_id, whole[-1]))
        return events

    def _validate_chunks(self, chunks: Sequence[PromptChunk]) -> None:
        for chunk in chunks:
            r = chunk.request
            whole = len(r.prompt_ids) + len(r.resume_ids)
            if (
                chunk.length < 1
                or chunk.start != self.prefilled.get(r.request_id, 0)
                or chunk.start + chunk.length > whole
                or r.request_id in self.batch
            ):
                raise ValueError(f"chunk {chunk.start}+{chunk.length} of {r.request_id!r} does not continue its prompt")

    def _validate(self, prefill: Sequence[GenerationRequest], decode: Sequence[str], padding: int) -> None:
        for r in prefill:
            if not r.prompt_ids or len(r.prompt_ids) + r.params.max_tokens > MAX_CONTEXT:
                raise ValueError(f"prompt of {len(r.prompt_ids)} tokens does not fit")
            if r.request_id in self.batch or len(r.resume_ids) >= r.params.max_tokens:
                raise ValueError(f"request {r.request_id!r} cannot be prefilled")
        if len(set(decode)) != len(decode) or any(rid not in self.batch for rid in decode) or padding < 0:
            raise ValueError("decode names a request that is not running, or twice")

    def prefill(self, requests: Sequence[GenerationRequest]) -> list[TokenEvent]:
        return self.step(prefill=requests)

    def decode_step(self) -> list[TokenEvent]:
        return self.step(decode=list(self.batch))

    def _advance(self, rid: str, previous: int) -> TokenEvent:
        run = self.batch[rid]
        index = len(run.generated)
        token = next_token(previous, index)
        run.generated.append(token)
        finished = len(run.generated) >= run.request.params.max_tokens
        if finished:
            del self.batch[rid]
        return TokenEvent(rid, token, index, chr(token), finished, "length" if finished else None)

    def running(self) -> list[str]:
        return list(self.batch)

    def abort(self, request_id: str) -> None:
        self.batch.pop(request_id, None)
        self.prefilled.pop(request_id, None)

    def export_request(self, request_id: str, into=None) -> KVHandoff:
        run = self.batch.pop(request_id)
        r = run.request
        kv = bytes(len(r.prompt_ids))
        if into is not None and (buffer := into(len(kv))) is not None:
            memoryview(buffer)[:], kv = kv, buffer
        return KVHandoff(
            r.request_id,
            self.model_name,
            r.params,
            r.prompt_ids,
            tuple(run.generated),
            "",
            b"",
            "uint8",
            (len(r.prompt_ids),),
            "fake:T",
            kv,
        )

    def import_request(self, handoff: KVHandoff) -> None:
        request = GenerationRequest(handoff.request_id, handoff.prompt_ids, handoff.params)
        self.batch[handoff.request_id] = _Running(request, list(handoff.generated_ids))


def load(*, device: str = "auto", num_threads: int | None = None) -> FakeEngine:
    return FakeEngine()
