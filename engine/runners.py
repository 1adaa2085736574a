"""Runners: a model plus its KV cache, behind the few calls the engine makes.

The engine keeps requests, sampling and stopping; a runner keeps tensors. Slot ``i`` of the runner
is request ``i`` of the engine's running batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from engine.kv_cache import KVCache
from engine.models.common import Batch

if TYPE_CHECKING:
    from engine.models import DecoderOnly


class Runner(Protocol):
    layout: str
    max_context: int
    prompt_in_context: bool  # whether the prompt counts towards max_context (decoder-only: yes)

    def step(
        self,
        prompts: list[list[int]],
        resumed: list[list[int]],
        last_tokens: list[int],
        padding: int,
        chunks: Sequence[tuple[int, list[int]]] = (),
    ) -> torch.Tensor:
        """One forward pass: slots ``0..k-1`` advance by their ``last_tokens`` (k,), ``padding`` rows are
        computed and dropped, and each prompt (with the tokens it resumes from) becomes a new slot at
        the end. Returns (k + len(prompts), V) logits: the decoded slots, then the new ones. On error
        the running slots are as they were.

        ``chunks``: only for runners that can prefill a prompt in chunks (``chunked_prefill`` True;
        the others raise ValueError for any): ``(slot, tokens)``, the next tokens of a prompt whose
        first part is in ``slot``; the logits then end with one row per chunk (its last token)."""
        ...

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor: ...  # (B, V), adds B slots
    def decode(self, last_tokens: list[int]) -> torch.Tensor: ...  # (B, V) for all live slots
    def rollback(self, size: int, live: int, chunks: Sequence[tuple[int, int]] = ()) -> None:
        """Undo the last ``step`` after it returned (what followed it failed): slots ``size..``
        are forgotten, slots ``0..live-1`` lose the position it wrote, and each ``(slot, count)``
        of its chunks the positions that chunk wrote."""
        ...

    def swap(self, pairs: list[tuple[int, int]]) -> None: ...  # exchange slots (i, j) of each pair
    def remove(self, slot: int) -> None: ...  # last slot moves into ``slot``
    def export(self, slot: int) -> torch.Tensor: ...
    def view(self, slot: int) -> torch.Tensor: ...  # what ``export`` copies, in place where it can be
    def import_(self, kv: torch.Tensor, generated: int) -> None: ...  # appended as the last slot
    def positions(self, prompt: int, generated: int) -> int: ...  # cached positions of such a request


class DecoderOnlyRunner:
    prompt_in_context = True
    chunked_prefill = True

    def __init__(
        self,
        model: DecoderOnly,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_context: int,
        cuda_graphs: bool = False,
    ) -> None:
        self.model = model
        self.device = device
        self.max_context = max_context
        layers, kv_heads, head_dim = model.cache_geometry()
        self.cache = KVCache(layers, kv_heads, head_dim, dtype=dtype, device=device, max_context=max_context)
        self.layout = f"{model.kind}:L,2,Hkv,T,D"
        # decode-only steps of the whole batch as replayed CUDA graphs (engine.cuda_graph); CUDA only
        self.decode_graphs = None
        if cuda_graphs and device.type == "cuda":
            from engine.cuda_graph import DecodeGraphs

            self.decode_graphs = DecodeGraphs(model, self.cache)

    def step(
        self,
        prompts: list[list[int]],
        resumed: list[list[int]],
        last_tokens: list[int],
        padding: int,
        chunks: Sequence[tuple[int, list[int]]] = (),
    ) -> torch.Tensor:
        if self.decode_graphs is not None and not prompts and not chunks:
            logits = self.decode_graphs.step(last_tokens, padding)
            if logits is not None:
                self.cache.advance(len(last_tokens))
                return logits
        size, live = self.cache.size, len(last_tokens)
        ids = torch.tensor(last_tokens, dtype=torch.int64).to(self.device, non_blocking=True)
        seqs = [p + r for p, r in zip(prompts, resumed)]  # a resumed request re-reads what it said
        try:
            logits = self.model(Batch.step(self.cache, ids, padding, seqs, self.device, chunks=chunks))
        except BaseException:
            self.cache.truncate(size)  # the running batch stays as it was
            raise
        self.cache.advance(live)
        for slot, tokens in chunks:
            self.cache.extend(slot, len(tokens))
        return drop_padding(logits, live, padding)

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        return self.step(prompts, [[] for _ in prompts], [], 0)

    def decode(self, last_tokens: list[int]) -> torch.Tensor:
        return self.step([], [], last_tokens, 0)

    def rollback(self, size: int, live: int, chunks: Sequence[tuple[int, int]] = ()) -> None:
        undo_step(self.cache, size, live, chunks)

    def swap(self, pairs: list[tuple[int, int]]) -> None:
        self.cache.swap(pairs)

    def remove(self, slot: int) -> None:
        self.cache.remove(slot)

    def export(self, slot: int) -> torch.Tensor:
        return self.cache.read(slot)

    def view(self, slot: int) -> torch.Tensor:
        return self.cache.view(slot)

    def import_(self, kv: torch.Tensor, generated: int) -> None:
        self.cache.append(kv)

    def positions(self, prompt: int, generated: int) -> int:
        return prompt + generated - 1  # the last generated token is not in the cache yet


def undo_step(cache: KVCache, size: int, live: int, chunks: Sequence[tuple[int, int]] = ()) -> None:
    """``Runner.rollback`` on one cache."""
    cache.truncate(size)
    cache.advance(live, by=-1)
    for slot, count in chunks:
        cache.extend(slot, -count)


def drop_padding(logits: torch.Tensor, live: int, padding: int) -> torch.Tensor:
    """(live + padding + B, V) -> (live + B, V): padding rows were computed only to be paid for."""
    if not padding:
        return logits
    return torch.cat([logits[:live], logits[live + padding :]])


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
