"""Time one layer of our engine on the local device, in the reference profiles' JSONL format.

Split rows (like ``profiles/h200-reference-split.jsonl``): ``part: rest`` by ``tokens`` (norms,
projections, MLP), ``attn_prefill`` by ``batch`` x ``seq`` (causal attention kernel incl. the KV
write), ``attn_decode`` by ``batch`` x ``ctx``. Layer rows (like ``h200-reference-layers.jsonl``):
``phase: prefill`` by batch x seq and ``phase: decode`` by batch x ctx, the whole layer.
``rest(tokens)`` is measured as a decode step of ``tokens`` sequences over one cached key minus
that step's attention, so the split adds up by construction. Decoder-only models only.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from engine.kv_cache import KVCache
from engine.models.common import Batch, attend_decode, attend_prefill


@dataclass(frozen=True)
class Grid:
    tokens: tuple[int, ...] = (1, 4, 16, 64, 256)
    prefill: tuple[tuple[int, int], ...] = ((1, 32), (1, 128), (4, 32), (4, 128))  # (batch, seq)
    decode: tuple[tuple[int, int], ...] = ((1, 128), (8, 128), (8, 512), (32, 128), (32, 512))  # (batch, ctx)


QUICK_GRID = Grid(tokens=(1,), prefill=((1, 8),), decode=((1, 8),))


class LayerProbe:
    """Layer 0 of a loaded decoder-only model, on a one-layer cache."""

    def __init__(self, engine) -> None:
        self.model = engine.runner.model
        if self.model.kind == "t5":
            raise ValueError("the profiler times decoder-only models (llama, opt, gpt2)")
        self.device = torch.device(engine.device)
        self.dtype = next(self.model.parameters()).dtype
        _, self.kv_heads, self.head_dim = self.model.cache_geometry()
        self.heads = self.model.args.num_attention_heads
        self.hidden = self.model.args.hidden_size

    def _cache(self, batch: int, ctx: int) -> KVCache:
        cache = KVCache(1, self.kv_heads, self.head_dim, dtype=self.dtype, device=self.device, max_context=ctx + 1)
        cache.add_slots([ctx] * batch)
        cache.reserve(batch, ctx + 1)
        return cache

    def _block(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        block = self.model.model.layers[0] if self.model.kind == "llama" else self.model.model.decoder.layers[0]
        if self.model.kind == "llama":
            cos, sin = self.model._rope_at(batch.positions)
            return block(x, 0, batch, cos, sin)
        return block(x, 0, batch)

    def prefill_layer(self, b: int, seq: int) -> Callable[[], object]:
        cache = KVCache(1, self.kv_heads, self.head_dim, dtype=self.dtype, device=self.device, max_context=seq)
        batch = Batch.prefill(cache, [[0] * seq] * b, self.device)
        x = torch.randn(b * seq, self.hidden, device=self.device, dtype=self.dtype)
        return lambda: self._block(x, batch)

    def decode_layer(self, b: int, ctx: int) -> Callable[[], object]:
        batch = Batch.decode(self._cache(b, ctx), torch.zeros(b, dtype=torch.int64, device=self.device))
        x = torch.randn(b, self.hidden, device=self.device, dtype=self.dtype)
        return lambda: self._block(x, batch)

    def attn_prefill(self, b: int, seq: int) -> Callable[[], object]:
        cache = KVCache(1, self.kv_heads, self.head_dim, dtype=self.dtype, device=self.device, max_context=seq)
        batch = Batch.prefill(cache, [[0] * seq] * b, self.device)
        q, k, v = self._qkv(b * seq)
        return lambda: attend_prefill(q, k, v, 0, batch, causal=True)

    def attn_decode(self, b: int, ctx: int) -> Callable[[], object]:
        batch = Batch.decode(self._cache(b, ctx), torch.zeros(b, dtype=torch.int64, device=self.device))
        q, k, v = self._qkv(b)
        return lambda: attend_decode(q, k, v, 0, batch)

    def _qkv(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        make = lambda h: torch.randn(n, h, self.head_dim, device=self.device, dtype=self.dtype)  # noqa: E731
        return make(self.heads), make(self.kv_heads), make(self.kv_heads)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds, after two warm-up calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(2):
            fn()
        samples = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def profile_rows(engine, model: str, grid: Grid = Grid(), repeats: int = 5) -> tuple[list[dict], list[dict]]:
    """(split rows, layer rows) for ``engine``'s model, labelled ``model``, tp 1."""
    probe = LayerProbe(engine)
    t = lambda fn: time_ms(fn, probe.device, repeats)  # noqa: E731
    base = {"model": model, "tp": 1}
    split: list[dict] = []
    for n in grid.tokens:
        rest = t(probe.decode_layer(n, 1)) - t(probe.attn_decode(n, 1))
        split.append({**base, "part": "rest", "tokens": n, "ms": max(rest, 0.0)})
    for b, seq in grid.prefill:
        split.append({**base, "part": "attn_prefill", "batch": b, "seq": seq, "ms": t(probe.attn_prefill(b, seq))})
    for b, ctx in grid.decode:
        split.append({**base, "part": "attn_decode", "batch": b, "ctx": ctx, "ms": t(probe.attn_decode(b, ctx))})
    layers = [{**base, "phase": "prefill", "batch": b, "seq": seq, "ms": t(probe.prefill_layer(b, seq))}
              for b, seq in grid.prefill]
    layers += [{**base, "phase": "decode", "batch": b, "ctx": ctx, "ms": t(probe.decode_layer(b, ctx))}
               for b, ctx in grid.decode]
    return split, layers


def header(engine) -> dict:
    device = torch.cuda.get_device_name(0) if engine.device.startswith("cuda") else f"cpu x{torch.get_num_threads()} threads"
    dtype = str(next(engine.runner.model.parameters()).dtype)
    return {"device": device, "torch": torch.__version__, "dtype": dtype, "kind": "exegpt engine, one layer"}


def write_jsonl(path: Path, head: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in [head, *rows]:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> Iterator[dict]:
    with path.open() as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
