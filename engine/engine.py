"""The engine: a running batch of requests over one model (see ``engine.api`` for the contract).

    prefill(reqs):  validate -> runner.prefill -> sample -> events -> drop finished
    decode_step():  runner.decode -> sample -> events -> drop finished
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from engine.api import GenerationRequest, KVHandoff, SamplingParams, TokenEvent, Tokenizer
from engine.runners import Runner
from engine.sampling import generator_state, make_generator, restore_generator, sample
from engine.stops import TextTracker


@dataclass
class _Running:
    request: GenerationRequest
    generated: list[int]
    gen: torch.Generator
    text: TextTracker


class LocalEngine:
    def __init__(self, runner: Runner, tokenizer: Tokenizer, *, model_name: str, device: str,
                 vocab_size: int, stop_token_ids: Sequence[int] = ()) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.device = device
        self.max_context = runner.max_context
        self.vocab_size = vocab_size
        self.stop_token_ids = frozenset({tokenizer.eos_token_id, *stop_token_ids})
        self._slots: list[_Running] = []  # slot order == runner slot order

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token of one request holds (T5: per decoder or per prompt token)."""
        cache = getattr(self.runner, "cache", None) or self.runner.self_cache
        return cache.bytes_per_position

    # ---- the contract -------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, requests: Sequence[GenerationRequest]) -> list[TokenEvent]:
        if not requests:
            return []
        self._validate(requests)
        logits = self.runner.prefill([list(r.prompt_ids) for r in requests])
        states = [_Running(r, [], make_generator(r.request_id, r.params), self._tracker(r.params))
                  for r in requests]
        self._slots.extend(states)
        return self._emit(logits, first=len(self._slots) - len(states))

    @torch.inference_mode()
    def decode_step(self) -> list[TokenEvent]:
        if not self._slots:
            return []
        logits = self.runner.decode([s.generated[-1] for s in self._slots])
        return self._emit(logits, first=0)

    def running(self) -> list[str]:
        return [s.request.request_id for s in self._slots]

    @torch.inference_mode()
    def abort(self, request_id: str) -> None:
        slot = self._find(request_id)
        if slot is not None:
            self._remove(slot)

    @torch.inference_mode()
    def export_request(self, request_id: str) -> KVHandoff:
        slot = self._find(request_id)
        if slot is None:
            raise KeyError(f"request {request_id!r} is not running")
        state = self._slots[slot]
        kv = self.runner.export(slot).cpu().contiguous()
        self._remove(slot)
        r = state.request
        return KVHandoff(
            request_id=r.request_id, model=self.model_name, params=r.params, prompt_ids=r.prompt_ids,
            generated_ids=tuple(state.generated), emitted_text=state.text.emitted,
            rng_state=generator_state(state.gen), dtype=str(kv.dtype).removeprefix("torch."),
            shape=tuple(kv.shape), layout=self.runner.layout, kv=kv.view(torch.uint8).numpy().tobytes(),
        )

    @torch.inference_mode()
    def import_request(self, handoff: KVHandoff) -> None:
        if handoff.model != self.model_name or handoff.layout != self.runner.layout:
            raise ValueError(f"hand-off for {handoff.model} ({handoff.layout}) cannot run on "
                             f"{self.model_name} ({self.runner.layout})")
        if self._find(handoff.request_id) is not None:
            raise ValueError(f"request {handoff.request_id!r} is already running")
        if not handoff.generated_ids:
            raise ValueError("hand-off has no generated token to continue from")
        dtype = getattr(torch, handoff.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown KV dtype {handoff.dtype!r}")
        positions = self.runner.positions(len(handoff.prompt_ids), len(handoff.generated_ids))
        if len(handoff.shape) != 5 or handoff.shape[3] != positions:
            raise ValueError(f"hand-off KV shape {handoff.shape} does not hold the {positions} positions "
                             f"its {len(handoff.prompt_ids)} prompt and {len(handoff.generated_ids)} generated tokens need")
        try:
            kv = torch.frombuffer(bytearray(handoff.kv), dtype=torch.uint8).view(dtype).reshape(handoff.shape)
            gen = restore_generator(handoff.rng_state)
        except RuntimeError as exc:
            raise ValueError(f"malformed hand-off for {handoff.request_id!r}: {exc}") from exc
        self.runner.import_(kv, len(handoff.generated_ids))
        request = GenerationRequest(handoff.request_id, handoff.prompt_ids, handoff.params)
        self._slots.append(_Running(request, list(handoff.generated_ids), gen,
                                    self._tracker(handoff.params, handoff.emitted_text)))

    # ---- steps ------------------------------------------------------------------------------

    def _validate(self, requests: Sequence[GenerationRequest]) -> None:
        seen = set(self.running())
        for r in requests:
            if r.request_id in seen:
                raise ValueError(f"request id {r.request_id!r} is already running or repeated")
            seen.add(r.request_id)
            if not r.prompt_ids:
                raise ValueError(f"request {r.request_id!r}: empty prompt")
            if self.runner.prompt_in_context and len(r.prompt_ids) >= self.max_context:
                raise ValueError(f"request {r.request_id!r}: prompt of {len(r.prompt_ids)} tokens leaves no "
                                 f"room in max_context {self.max_context}")
            if len(r.prompt_ids) > self.max_context:
                raise ValueError(f"request {r.request_id!r}: prompt of {len(r.prompt_ids)} tokens exceeds "
                                 f"max_context {self.max_context}")
            bad = [t for t in r.prompt_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"request {r.request_id!r}: token id {bad[0]} outside vocabulary of {self.vocab_size}")

    def _emit(self, logits: torch.Tensor, first: int) -> list[TokenEvent]:
        """Sample for slots ``first..``, record the tokens, and drop the requests that finished."""
        states = self._slots[first:]
        tokens = sample(logits, [s.request.params for s in states], [s.gen for s in states])
        events = [self._advance(s, t) for s, t in zip(states, tokens)]
        for slot in reversed(range(first, len(self._slots))):
            if events[slot - first].finished:
                self._remove(slot)
        return events

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
