"""Runners: a model plus its KV cache, behind the few calls the engine makes.

The engine keeps requests, sampling and stopping; a runner keeps tensors. Slot ``i`` of the runner
is request ``i`` of the engine's running batch.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from engine.kv_cache import KVCache
from engine.models.common import Batch


class Runner(Protocol):
    layout: str
    max_context: int
    prompt_in_context: bool  # whether the prompt counts towards max_context (decoder-only: yes)

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor: ...  # (B, V), adds B slots
    def decode(self, last_tokens: list[int]) -> torch.Tensor: ...  # (B, V) for all live slots
    def remove(self, slot: int) -> None: ...  # last slot moves into ``slot``
    def export(self, slot: int) -> torch.Tensor: ...
    def import_(self, kv: torch.Tensor, generated: int) -> None: ...  # appended as the last slot
    def positions(self, prompt: int, generated: int) -> int: ...  # cached positions of such a request


class DecoderOnlyRunner:
    prompt_in_context = True

    def __init__(self, model: nn.Module, *, device: torch.device, dtype: torch.dtype, max_context: int) -> None:
        self.model = model
        self.device = device
        self.max_context = max_context
        layers, kv_heads, head_dim = model.cache_geometry()
        self.cache = KVCache(layers, kv_heads, head_dim, dtype=dtype, device=device, max_context=max_context)
        self.layout = f"{model.kind}:L,2,Hkv,T,D"

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        size = self.cache.size
        try:
            return self.model(Batch.prefill(self.cache, prompts, self.device))
        except BaseException:
            self.cache.truncate(size)  # the running batch stays as it was
            raise

    def decode(self, last_tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor(last_tokens, dtype=torch.int64).to(self.device, non_blocking=True)
        logits = self.model(Batch.decode(self.cache, ids))
        self.cache.advance()
        return logits

    def remove(self, slot: int) -> None:
        self.cache.remove(slot)

    def export(self, slot: int) -> torch.Tensor:
        return self.cache.read(slot)

    def import_(self, kv: torch.Tensor, generated: int) -> None:
        self.cache.append(kv)

    def positions(self, prompt: int, generated: int) -> int:
        return prompt + generated - 1  # the last generated token is not in the cache yet


def greedy_logits(runner: Runner, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits that chose them, through prefill/decode on an empty runner.

    For oracle checks against a reference implementation; the runner is left empty again.
    """
    with torch.inference_mode():
        rows = [runner.prefill([prompt])[0]]
        tokens = [int(rows[-1].argmax())]
        for _ in range(steps - 1):
            rows.append(runner.decode([tokens[-1]])[0])
            tokens.append(int(rows[-1].argmax()))
        runner.remove(0)
    return tokens, torch.stack(rows)
