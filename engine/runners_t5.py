"""Runner for encoder-decoder models: a step encodes the new prompts, then takes one decoder pass over
the decoded slots and the new ones (their first decoder step, or a teacher-forced run through the
tokens a resumed request already produced).

Slot ``i`` owns row ``i`` of both caches. A hand-off carries both, concatenated along positions:
``(L, 2, H, T + S, D)`` with the decoder's ``T = len(generated_ids)`` positions first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.kv_cache import KVCache
from engine.models.common import Batch
from engine.models.t5 import T5
from engine.runners import drop_padding, undo_step


class EncoderDecoderRunner:
    prompt_in_context = False
    layout = "t5:self+cross:L,2,H,T+S,D"

    def __init__(self, model: T5, *, device: torch.device, dtype: torch.dtype, max_context: int) -> None:
        self.model, self.device, self.max_context = model, device, max_context
        layers, heads, head_dim = model.cache_geometry()
        make = lambda: KVCache(layers, heads, head_dim, dtype=dtype, device=device, max_context=max_context)  # noqa: E731
        self.self_cache, self.cross_cache = make(), make()

    def step(
        self,
        prompts: list[list[int]],
        resumed: list[list[int]],
        last_tokens: list[int],
        padding: int,
        chunks: Sequence[tuple[int, list[int]]] = (),
    ) -> torch.Tensor:
        """The encoder runs over the new prompts (filling their cross slots), then one decoder pass:
        slots ``0..k-1`` advance by one token, padding rows are paid for, and each new slot is
        teacher-forced through the decoder start token and the tokens it resumes from. No prompt
        is prefilled in chunks (``chunks`` is ValueError)."""
        if chunks:
            raise ValueError("an encoder-decoder model cannot prefill in chunks")
        size, live = self.self_cache.size, len(last_tokens)
        ids = torch.tensor(last_tokens, dtype=torch.int64).to(self.device)
        start = self.model.args.decoder_start_token_id
        try:
            if prompts:
                self.model.encode(Batch.prefill(self.cross_cache, prompts, self.device, causal=False))
            cross = self.cross_cache
            cross.reserve(max(cross.size, live + padding), max(cross.lengths, default=1))  # padding rows read it
            batch = Batch.step(self.self_cache, ids, padding, [[start, *r] for r in resumed], self.device)
            logits = self.model.decode(batch, cross)
        except BaseException:
            self.self_cache.truncate(size)  # the running batch stays as it was
            self.cross_cache.truncate(size)
            raise
        self.self_cache.advance(live)
        return drop_padding(logits, live, padding)

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        return self.step(prompts, [[] for _ in prompts], [], 0)

    def decode(self, last_tokens: list[int]) -> torch.Tensor:
        return self.step([], [], last_tokens, 0)

    def rollback(self, size: int, live: int, chunks: Sequence[tuple[int, int]] = ()) -> None:
        undo_step(self.self_cache, size, live)
        self.cross_cache.truncate(size)

    def swap(self, pairs: list[tuple[int, int]]) -> None:
        self.self_cache.swap(pairs)
        self.cross_cache.swap(pairs)

    def remove(self, slot: int) -> None:
        self.self_cache.remove(slot)
        self.cross_cache.remove(slot)

    def export(self, slot: int) -> torch.Tensor:
        return self.view(slot)

    def view(self, slot: int) -> torch.Tensor:  # two caches: joined, a copy
        return torch.cat([self.self_cache.view(slot), self.cross_cache.view(slot)], dim=3)

    def positions(self, prompt: int, generated: int) -> int:
        return generated + prompt  # decoder start token + generated[:-1], then the encoder positions

    def import_(self, kv: torch.Tensor, generated: int) -> None:
        if kv.shape[3] <= generated:
            raise ValueError(f"T5 hand-off of {kv.shape[3]} positions cannot hold {generated} decoder positions")
        self.self_cache.append(kv[:, :, :, :generated])
        self.cross_cache.append(kv[:, :, :, generated:])
