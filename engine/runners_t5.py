"""Runner for encoder-decoder models: prefill encodes the prompts and takes the first decoder step.

Slot ``i`` owns row ``i`` of both caches. A hand-off carries both, concatenated along positions:
``(L, 2, H, T + S, D)`` with the decoder's ``T = len(generated_ids)`` positions first.
"""

from __future__ import annotations

import torch

from engine.kv_cache import KVCache
from engine.models.common import Batch
from engine.models.t5 import T5


class EncoderDecoderRunner:
    prompt_in_context = False
    layout = "t5:self+cross:L,2,H,T+S,D"

    def __init__(self, model: T5, *, device: torch.device, dtype: torch.dtype, max_context: int) -> None:
        self.model, self.device, self.max_context = model, device, max_context
        layers, heads, head_dim = model.cache_geometry()
        make = lambda: KVCache(layers, heads, head_dim, dtype=dtype, device=device, max_context=max_context)  # noqa: E731
        self.self_cache, self.cross_cache = make(), make()

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        size = self.self_cache.size
        try:
            batch = Batch.prefill(self.cross_cache, prompts, self.device, causal=False)
            self.self_cache.add_slots([0] * len(prompts))
            self.self_cache.reserve(self.self_cache.size, 1)
            self.model.encode(batch)
            start = torch.full((len(prompts),), self.model.args.decoder_start_token_id, dtype=torch.int64)
            return self._step(start.to(self.device), batch.first_slot)
        except BaseException:
            self.self_cache.truncate(size)  # the running batch stays as it was
            self.cross_cache.truncate(size)
            raise

    def decode(self, last_tokens: list[int]) -> torch.Tensor:
        return self._step(torch.tensor(last_tokens, dtype=torch.int64).to(self.device), 0)

    def _step(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        cache = self.self_cache
        cache.reserve(cache.size, max(cache.lengths[start:]) + 1)
        logits = self.model.decode(tokens, cache, self.cross_cache, start)
        for i in range(start, cache.size):
            cache.lengths[i] += 1
        cache.lengths_t[start:cache.size] += 1
        return logits

    def remove(self, slot: int) -> None:
        self.self_cache.remove(slot)
        self.cross_cache.remove(slot)

    def export(self, slot: int) -> torch.Tensor:
        return torch.cat([self.self_cache.read(slot), self.cross_cache.read(slot)], dim=3)

    def positions(self, prompt: int, generated: int) -> int:
        return generated + prompt  # decoder start token + generated[:-1], then the encoder positions

    def import_(self, kv: torch.Tensor, generated: int) -> None:
        if kv.shape[3] <= generated:
            raise ValueError(f"T5 hand-off of {kv.shape[3]} positions cannot hold {generated} decoder positions")
        self.self_cache.append(kv[:, :, :, :generated])
        self.cross_cache.append(kv[:, :, :, generated:])
