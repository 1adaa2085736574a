"""The engine: a running batch of requests over one model (see ``engine.api`` for the contract).

    step(prefill, decode, padding, chunks):  validate -> decoded slots to the front -> runner.step
                                     (one forward pass) -> sample -> events -> drop finished
    (a failure before the events undoes the step: the new requests never joined)
    prefill(reqs) = step(prefill=reqs);  decode_step() = step(decode=<every running request>)

Chunked prefill: a request's first chunk gives it a slot holding that many positions (it is not
running: no token yet), each next chunk appends its positions in a later step (decode rows, whole
prompts and chunks share the step's one forward pass), and its last chunk's logits give its first
token. A chunk covering a whole prompt is a plain prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from engine.api import (
    GenerationRequest,
    KVHandoff,
    PromptChunk,
    RequestRejected,
    SamplingParams,
    TokenEvent,
    Tokenizer,
    sampling_problem,
)
from engine.runners import Runner
from engine.sampling import (
    generator_state,
    hold_back_stops,
    logprobs_of,
    make_generator,
    penalise,
    restore_generator,
    sample,
)
from engine.stops import TextTracker


@dataclass
class _Running:
    request: GenerationRequest
    generated: list[int]
    gen: torch.Generator
    text: TextTracker
    pending: int = 0  # prompt tokens a chunked prefill has still to run (0: running)


class LocalEngine:
    def __init__(
        self,
        runner: Runner,
        tokenizer: Tokenizer,
        *,
        model_name: str,
        device: str,
        vocab_size: int,
        stop_token_ids: Sequence[int] = (),
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.device = device
        self.max_context = runner.max_context
        self.vocab_size = vocab_size
        self.stop_token_ids = frozenset({tokenizer.eos_token_id, *stop_token_ids})
        self._slots: list[_Running] = []  # slot order == runner slot order
        self.kv_budget_tokens: int | None = None  # set_kv_budget

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token of one request holds (T5: per decoder or per prompt token)."""
        # the decoder-only runners' one cache, or the encoder-decoder runner's self-attention cache
        cache = getattr(self.runner, "cache", None) or getattr(self.runner, "self_cache", None)
        if cache is None:
            raise AttributeError(f"{type(self.runner).__name__} has neither cache nor self_cache")
        return cache.bytes_per_position

    def set_kv_budget(self, budget_bytes: int) -> int:
        """Cap the KV cache at ``budget_bytes`` (it grows to that at most; a request or batch that
        would need more is refused); returns the budget in token positions (``kv_budget_tokens``)."""
        caches = [
            c
            for c in (getattr(self.runner, n, None) for n in ("cache", "self_cache", "cross_cache"))
            if c is not None and hasattr(c, "kv")
        ]
        per_token = sum(c.bytes_per_position for c in caches) or self.kv_bytes_per_token
        self.kv_budget_tokens = max(int(budget_bytes) // per_token, 1)
        for cache in caches:
            cache.budget = self.kv_budget_tokens
        return self.kv_budget_tokens

    @property
    def kv_allocated_bytes(self) -> int | None:
        """KV-cache bytes this process has allocated (None where the runner keeps none here)."""
        caches = [getattr(self.runner, name, None) for name in ("cache", "self_cache", "cross_cache")]
        tensors = [t for t in (getattr(cache, "kv", None) for cache in caches) if t is not None]
        if not tensors:
            return None
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- the contract -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(
        self,
        prefill: Sequence[GenerationRequest] = (),
        decode: Sequence[str] = (),
        padding: int = 0,
        chunks: Sequence[PromptChunk] = (),
    ) -> list[TokenEvent]:
        whole, first, later = self._sort_chunks(chunks)
        joining = [*prefill, *whole, *(c.request for c in first)]
        self._validate(joining)
        slots = self._validate_decode(decode, joining, padding)
        self._to_front(slots)
        return self._execute([*prefill, *whole], len(slots), padding, first, later)

    def prefill(self, requests: Sequence[GenerationRequest]) -> list[TokenEvent]:
        return self.step(prefill=requests)

    @torch.inference_mode()
    def decode_step(self) -> list[TokenEvent]:
        if any(s.pending for s in self._slots):
            return self.step(decode=self.running())
        return self._execute((), len(self._slots), 0)  # every slot is already in place

    def running(self) -> list[str]:
        return [s.request.request_id for s in self._slots if not s.pending]

    @torch.inference_mode()
    def abort(self, request_id: str) -> None:
        slot = self._find(request_id)
        if slot is not None:
            self._remove(slot)

    @torch.inference_mode()
    def export_request(self, request_id: str, into: Callable[[int], Any] | None = None) -> KVHandoff:
        slot = self._find(request_id)
        if slot is None:
            raise KeyError(f"request {request_id!r} is not running")
        state = self._slots[slot]
        if state.pending:
            raise ValueError(f"request {request_id!r} is still being prefilled")
        kv = self.runner.view(slot)  # (L, 2, Hkv, T, D): the slot itself, valid until it is removed
        data = _exported(kv, into)
        self._remove(slot)
        r = state.request
        return KVHandoff(
            request_id=r.request_id,
            model=self.model_name,
            params=r.params,
            prompt_ids=r.prompt_ids,
            generated_ids=tuple(state.generated),
            emitted_text=state.text.emitted,
            rng_state=generator_state(state.gen),
            dtype=str(kv.dtype).removeprefix("torch."),
            shape=tuple(kv.shape),
            layout=self.runner.layout,
            kv=data,
        )

    @torch.inference_mode()
    def import_request(self, handoff: KVHandoff) -> None:
        if handoff.model != self.model_name or handoff.layout != self.runner.layout:
            raise ValueError(
                f"hand-off for {handoff.model} ({handoff.layout}) cannot run on "
                f"{self.model_name} ({self.runner.layout})"
            )
        if self._find(handoff.request_id) is not None:
            raise ValueError(f"request {handoff.request_id!r} is already running")
        if (problem := sampling_problem(handoff.params)) is not None:
            raise RequestRejected(handoff.request_id, problem)
        if not handoff.generated_ids:
            raise ValueError("hand-off has no generated token to continue from")
        dtype = getattr(torch, handoff.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown KV dtype {handoff.dtype!r}")
        positions = self.runner.positions(len(handoff.prompt_ids), len(handoff.generated_ids))
        if len(handoff.shape) != 5 or handoff.shape[3] != positions:
            raise ValueError(
                f"hand-off KV shape {handoff.shape} does not hold the {positions} positions "
                f"its {len(handoff.prompt_ids)} prompt and {len(handoff.generated_ids)} generated "
                "tokens need"
            )
        try:
            raw = bytearray(handoff.kv) if isinstance(handoff.kv, bytes) else handoff.kv  # a writable buffer: in place
            kv = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(handoff.shape)
            gen = restore_generator(handoff.rng_state)
        except RuntimeError as exc:
            raise ValueError(f"malformed hand-off for {handoff.request_id!r}: {exc}") from exc
        self.runner.import_(kv, len(handoff.generated_ids))
        request = GenerationRequest(handoff.request_id, handoff.prompt_ids, handoff.params)
        self._slots.append(
            _Running(request, list(handoff.generated_ids), gen, self._tracker(handoff.params, handoff.emitted_text))
        )

    # ---- steps ------------------------------------------------------------------------------

    def _execute(
        self,
        requests: Sequence[GenerationRequest],
        live: int,
        padding: int,
        first: Sequence[PromptChunk] = (),
        later: Sequence[PromptChunk] = (),
    ) -> list[TokenEvent]:
        """One forward pass: slots ``0..live-1`` advance, ``padding`` rows are paid for, ``requests``
        and the ``first`` chunks join at the end, the ``later`` chunks extend their slots; then
        sample (decoded slots, new requests, chunks that end their prompt), emit, and drop the
        requests that finished.

        Transactional: until every row is sampled nothing is committed. A failure after the
        forward pass undoes it (the runner's ``rollback``, the samplers' draws), so the batch is
        exactly as it was and the new requests never joined it."""
        if not (requests or live or padding or first or later):
            return []
        prompts = [list(r.prompt_ids) for r in requests] + [_tokens(c.request)[: c.length] for c in first]
        resumed = [list(r.resume_ids) for r in requests] + [[] for _ in first]
        cont: list[tuple[int, PromptChunk]] = []
        for c in later:
            slot = self._find(c.request.request_id)
            assert slot is not None  # _sort_chunks checked that a later chunk continues a slot's prefill
            cont.append((slot, c))
        args = (prompts, resumed, [s.generated[-1] for s in self._slots[:live]], padding)
        if cont:
            slices = [(slot, _tokens(self._slots[slot].request)[c.start : c.start + c.length]) for slot, c in cont]
            logits = self.runner.step(*args, chunks=slices)
        else:
            logits = self.runner.step(*args)  # a failure here is undone by the runner
        size = len(self._slots)
        joining = [self._new_state(r) for r in requests]
        joining += [self._new_state(c.request, len(_tokens(c.request)) - c.length) for c in first]
        picked = [(i, i) for i in range(live)] + [(size + j, live + j) for j in range(len(requests))]
        picked += [
            (slot, live + len(prompts) + j) for j, (slot, c) in enumerate(cont) if self._slots[slot].pending == c.length
        ]  # its last chunk: the first token
        try:
            if len(picked) != logits.shape[0]:
                logits = logits[torch.tensor([row for _, row in picked], dtype=torch.long, device=logits.device)]
            states = self._slots + joining
            chosen = self._choose(logits, [states[slot] for slot, _ in picked]) if picked else ([], None)
        except BaseException:
            self.runner.rollback(size, live, [(slot, c.length) for slot, c in cont])
            raise
        self._slots.extend(joining)  # committed: the new requests join, the chunks count
        for slot, c in cont:
            self._slots[slot].pending -= c.length
        return self._emit([slot for slot, _ in picked], *chosen)

    def _choose(
        self, logits: torch.Tensor, states: list[_Running]
    ) -> tuple[list[int], list[tuple[float | None, tuple[tuple[int, float], ...]]] | None]:
        """The next token of each of ``states`` (the rows of ``logits``) and, where asked for,
        its log-probabilities. Changes nothing it does not undo on failure: the samplers' states
        are restored when it raises."""
        params = [s.request.params for s in states]
        history = [s.generated for s in states]
        drawn = [(s.gen, s.gen.get_state()) for s in states if s.request.params.temperature > 0]
        try:
            logits = hold_back_stops(penalise(logits, params, history), params, history, self.stop_token_ids)
            tokens = sample(logits, params, [s.gen for s in states])
            logged = logprobs_of(logits, params, tokens) if any(p.logprobs is not None for p in params) else None
        except BaseException:
            for gen, state in drawn:
                gen.set_state(state)
            raise
        return tokens, logged

    def _emit(
        self,
        slots: list[int],
        tokens: list[int],
        logged: list[tuple[float | None, tuple[tuple[int, float], ...]]] | None,
    ) -> list[TokenEvent]:
        """Each of ``slots`` takes its token: its event; then the finished leave the batch."""
        events = [self._advance(self._slots[slot], token) for slot, token in zip(slots, tokens)]
        if logged is not None:
            events = [
                replace(e, logprob=lp, top_logprobs=top) if lp is not None else e
                for e, (lp, top) in zip(events, logged)
            ]
        for slot, event in sorted(zip(slots, events), key=lambda pair: -pair[0]):
            if event.finished:
                self._remove(slot)  # highest first: the slot moved into it has been handled
        return events

    def _sort_chunks(self, chunks: Sequence[PromptChunk]):
        """(whole prompts, first chunks, later chunks) of a step's ``chunks``, checked."""
        if chunks and not getattr(self.runner, "chunked_prefill", False):
            raise ValueError(f"{self.model_name} cannot prefill in chunks")
        whole, first, later, seen = [], [], [], set()
        for c in chunks:
            rid, total = c.request.request_id, len(_tokens(c.request))
            if rid in seen:
                raise RequestRejected(rid, "repeated in chunks")
            seen.add(rid)
            if not (c.start >= 0 and c.length >= 1 and c.start + c.length <= total):
                raise RequestRejected(rid, f"chunk {c.start}+{c.length} outside its {total} prompt tokens")
            if c.start == 0 and c.length == total:
                whole.append(c.request)
                continue
            if c.start == 0:
                first.append(c)
                continue
            slot = self._find(rid)
            if slot is None or self._slots[slot].pending != total - c.start:
                raise RequestRejected(rid, f"chunk from {c.start} does not continue its prefill")
            later.append(c)
        return whole, first, later

    def _new_state(self, r: GenerationRequest, pending: int = 0) -> _Running:
        # a resumed request's sampler restarts from its seed: its text continues, but a sampled
        # continuation need not be the one an uninterrupted run would have drawn
        return _Running(
            r,
            list(r.resume_ids),
            make_generator(r.request_id, r.params),
            self._tracker(r.params, r.resume_text),
            pending,
        )

    def _validate(self, requests: Sequence[GenerationRequest]) -> None:
        """``RequestRejected`` naming the first of ``requests`` that cannot join the batch."""
        seen = {s.request.request_id for s in self._slots}
        for r in requests:
            if r.request_id in seen:
                raise RequestRejected(r.request_id, "id is already running or repeated")
            seen.add(r.request_id)
            if (problem := self._problem(r)) is not None:
                raise RequestRejected(r.request_id, problem)

    def _problem(self, r: GenerationRequest) -> str | None:
        """Why ``r`` cannot run on this engine (None: it can)."""
        if (problem := sampling_problem(r.params)) is not None:
            return problem
        if not r.prompt_ids:
            return "empty prompt"
        used = len(r.resume_ids) + (len(r.prompt_ids) if self.runner.prompt_in_context else 0)
        if used >= self.max_context:
            resumed = f" and {len(r.resume_ids)} resumed tokens" if r.resume_ids else ""
            return f"prompt of {len(r.prompt_ids)} tokens{resumed} leaves no room in max_context {self.max_context}"
        if len(r.prompt_ids) > self.max_context:
            return f"prompt of {len(r.prompt_ids)} tokens exceeds max_context {self.max_context}"
        most = used + r.params.max_tokens - len(r.resume_ids)
        if self.kv_budget_tokens is not None and min(most, self.max_context) > self.kv_budget_tokens:
            return (
                f"prompt + max_tokens need {most} positions of KV cache; this worker's cache holds "
                f"{self.kv_budget_tokens} (lower max_tokens)"
            )
        if len(r.resume_ids) >= r.params.max_tokens:
            return f"resumes from {len(r.resume_ids)} tokens, max_tokens is {r.params.max_tokens}"
        bad = [t for t in (*r.prompt_ids, *r.resume_ids) if not 0 <= t < self.vocab_size]
        if bad:
            return f"token id {bad[0]} outside vocabulary of {self.vocab_size}"
        return None

    def _validate_decode(self, decode: Sequence[str], prefill: Sequence[GenerationRequest], padding: int) -> list[int]:
        """The slots of the requests to decode, after checking the step's decode list and padding."""
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
        where = {s.request.request_id: i for i, s in enumerate(self._slots)}
        new = {r.request_id for r in prefill}
        slots: dict[str, int] = {}
        for rid in decode:
            if rid in new:
                raise ValueError(f"request {rid!r} cannot be prefilled and decoded in one step")
            if rid in slots:
                raise ValueError(f"request {rid!r} is repeated in decode")
            if rid not in where or self._slots[where[rid]].pending:
                raise ValueError(f"request {rid!r} is not running")
            slots[rid] = where[rid]
        return list(slots.values())

    def _to_front(self, slots: list[int]) -> None:
        """Move the requests in ``slots`` to slots ``0..k-1`` (those already there stay), in the runner
        and here; none move when the step decodes every running request."""
        k, wanted = len(slots), set(slots)
        holes = [i for i in range(k) if i not in wanted]
        pairs = list(zip(holes, [i for i in slots if i >= k]))
        if pairs:
            self.runner.swap(pairs)
            for i, j in pairs:
                self._slots[i], self._slots[j] = self._slots[j], self._slots[i]

    def _advance(self, state: _Running, token: int) -> TokenEvent:
        state.generated.append(token)
        params, generated = state.request.params, state.generated
        index = len(generated) - 1
        if token in self.stop_token_ids and not params.ignore_eos:
            return self._event(state, token, index, state.text.finish(generated[:-1]), "stop")
        text, stopped = state.text.push(generated)
        if stopped:
            return self._event(state, token, index, text, "stop")
        used = len(generated) + (len(state.request.prompt_ids) if self.runner.prompt_in_context else 0)
        if len(generated) >= params.max_tokens or used >= self.max_context:
            return self._event(state, token, index, text + state.text.finish(generated), "length")
        return self._event(state, token, index, text, None)

    @staticmethod
    def _event(state: _Running, token: int, index: int, text: str, reason) -> TokenEvent:
        return TokenEvent(state.request.request_id, token, index, text, reason is not None, reason)

    def _tracker(self, params: SamplingParams, emitted: str = "") -> TextTracker:
        # forced-length mode decodes exactly max_tokens: neither EOS nor stop strings end it
        return TextTracker(self.tokenizer, () if params.ignore_eos else params.stop, emitted)

    def _find(self, request_id: str) -> int | None:
        for i, s in enumerate(self._slots):
            if s.request.request_id == request_id:
                return i
        return None

    def _remove(self, slot: int) -> None:
        """Compaction: the last slot moves into the freed one, in the runner and here."""
        self.runner.remove(slot)
        last = self._slots.pop()
        if slot < len(self._slots):
            self._slots[slot] = last


def _tokens(request: GenerationRequest) -> list[int]:
    """What a prefill runs through the model: the prompt, then the tokens it resumes from."""
    return [*request.prompt_ids, *request.resume_ids]


def _exported(kv: torch.Tensor, into: Callable[[int], Any] | None) -> Any:
    """A slot's KV copied out of the cache: once, into ``into``'s buffer (from the device too),
    or where ``into`` gives none, to bytes (a contiguous copy, then the bytes: two)."""
    buffer = into(kv.numel() * kv.element_size()) if into is not None else None
    if buffer is None:
        return kv.cpu().contiguous().view(torch.uint8).numpy().tobytes()
    torch.frombuffer(buffer, dtype=torch.uint8).view(kv.dtype).view(kv.shape).copy_(kv)
    return buffer
