"""Static-shape decode steps, captured as CUDA graphs, for decoder-only models (Llama, OPT/GPT-2).

A normal decode step (``engine.models.common.Decodes``) has shapes that change every step: the
number of rows, the longest context ``t_max``, whether a length mask is needed. None of that can be
captured. The static step fixes every shape in advance:

- **rows**: a bucket ``B`` from ``BUCKETS`` (1, 2, 4, ..., 256), the smallest that holds the step's
  rows (the running batch plus any requested padding); rows past the live ones are padding rows;
- **keys**: every row attends over a fixed span ``S`` of positions, the smallest of the ladder
  64, 96, 128, 192, 256, 384, ... (ratio 1.5 then 4/3) that holds ``t_max``, capped at the cache's
  capacity ``Tcap`` (a request's context within a span does not change the graph);
- **mask and positions** come from the cache's per-slot lengths on the device
  (``KVCache.lengths_t``): live row ``i`` sits at position ``lengths_t[i]`` and sees keys
  ``0..lengths_t[i]``; padding rows sit at position 0 of their own slot (a slot past the running
  batch, which holds nothing) and see that key only; K/V are written with device-tensor indices.

The step reads its inputs from static buffers (token ids and the live-row count, one host-to-device
copy per step) and writes logits to a static output, so on CUDA each ``(B, S)`` is captured once
and replayed; there is no host synchronisation and no Python-dependent shape inside.

A graph holds raw pointers into the cache tensor, so all graphs are dropped when the cache grows
(new capacity, new tensor) and are captured again for the new one, lazily, the first time a step
needs them. The static step needs ``B`` slots in the cache: a batch of 130 decodes as a bucket of
256 rows, and the cache grows to at least 256 slots (about twice the batch's own at most).

The runner (``engine.runners.DecoderOnlyRunner``) uses it for decode-only steps of the whole
running batch when ``load_engine(..., cuda_graphs=True)`` on CUDA, and takes the normal path for
prefill and mixed steps, steps that decode only some requests, more than 256 rows, or a context
past ``max_context`` (whose error the normal path raises). With ``capture=False`` the same static
forward runs without a graph (on any device): that is how the CPU tests check it against the normal
path. Graphs share one memory pool: a graph's output is read right after its replay, before any other
graph runs, so their intermediates may overlap.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.kv_cache import KVCache
from engine.models.common import Batch, Decodes

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_SPAN = 64
MAX_GRAPHS = 24  # captured (bucket, span) pairs kept; the least recently used beyond it are dropped


def bucket_for(rows: int) -> int | None:
    """The smallest bucket holding ``rows`` rows; None past the largest."""
    return next((b for b in BUCKETS if b >= rows), None)


def span_for(needed: int, capacity: int) -> int:
    """Key span for a step whose longest row needs ``needed`` positions, within ``capacity``."""
    span = MIN_SPAN
    while span < needed:
        span = span * 3 // 2 if span & (span - 1) == 0 else span * 4 // 3  # 64, 96, 128, 192, 256, ...
    return min(span, capacity)


@dataclass
class _Static:
    """One (bucket, span): its input buffers, and on CUDA its graph and output."""

    bucket: int
    span: int
    inputs: torch.Tensor  # (B + 1,) int64: token ids of the rows, then the live-row count
    rows: torch.Tensor  # (B,) 0..B-1: slot of each row
    keys: torch.Tensor  # (S,) 0..S-1
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None  # (B, V) logits the graph writes


class DecodeGraphs:
    """Static decode steps over ``model`` and ``cache``, captured per (bucket, span) on CUDA.

    ``step`` returns the live rows' logits, or None where the runner must take the normal path.
    ``capture``: None captures on CUDA only; False runs the static forward eagerly (any device).
    ``counts``: steps taken here (``static``), graphs captured (``captures``), steps left to the
    normal path (``fallbacks``), all graphs dropped because the cache grew (``resets``).
    """

    def __init__(
        self, model: nn.Module, cache: KVCache, *, capture: bool | None = None, max_graphs: int = MAX_GRAPHS
    ) -> None:
        on_cuda = cache.device.type == "cuda"
        if capture and not on_cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.cache = model, cache
        self.capture = on_cuda if capture is None else capture
        self.max_graphs = max_graphs
        self.disabled: str | None = None  # why capture failed (then every step takes the normal path)
        self.counts = {"static": 0, "captures": 0, "fallbacks": 0, "resets": 0}
        self._statics: OrderedDict[tuple[int, int], _Static] = OrderedDict()
        self._kv: weakref.ref | None = None  # the cache tensor the graphs point into (not kept alive)
        self._pool: _POOL_HANDLE | None = None

    def step(self, last_tokens: list[int], padding: int = 0) -> torch.Tensor | None:
        """A decode step of every live slot (``last_tokens`` (k,)) plus ``padding`` rows that change
        nothing: (k, V) float logits, or None when the step must take the normal path. The caller
        advances the cache's lengths, as after a normal step."""
        cache = self.cache
        live = len(last_tokens)
        bucket = bucket_for(live + padding)
        needed = max(cache.lengths, default=0) + 1
        if self.disabled or not live or live != cache.size or bucket is None or needed > cache.max_context:
            self.counts["fallbacks"] += 1
            return None
        cache.reserve(bucket, needed)
        if self._kv is None or self._kv() is not cache.kv:  # new capacity: graphs into the old tensor are stale
            if self._statics:
                self.counts["resets"] += 1
            self.clear()
            self._kv = weakref.ref(cache.kv)
        static = self._static(bucket, span_for(needed, cache.kv.shape[4]))
        host = torch.tensor([*last_tokens, *[0] * (bucket - live), live], dtype=torch.int64)
        static.inputs.copy_(host, non_blocking=True)  # pageable source: staged before the call returns
        if not self.capture:
            self.counts["static"] += 1
            return self._forward(static)[:live]
        if static.graph is None and not self._capture(static):
            self.counts["fallbacks"] += 1
            return None
        assert static.graph is not None and static.out is not None  # captured, now or before
        static.graph.replay()
        self.counts["static"] += 1
        return static.out[:live].clone()  # the next replay overwrites the output buffer

    def clear(self) -> None:
        """Drop every graph (and the memory its buffers hold). The next capture starts a new memory
        pool: a pool whose graphs are all gone is released and cannot be captured into again."""
        self._statics.clear()
        self._kv = None
        self._pool = None

    @property
    def graphs(self) -> int:
        return sum(s.graph is not None for s in self._statics.values())

    def _static(self, bucket: int, span: int) -> _Static:
        key = (bucket, span)
        static = self._statics.get(key)
        if static is None:
            dev = self.cache.device
            static = _Static(
                bucket,
                span,
                torch.zeros(bucket + 1, dtype=torch.int64, device=dev),
                torch.arange(bucket, device=dev),
                torch.arange(span, device=dev),
            )
            self._statics[key] = static
            while len(self._statics) > self.max_graphs:
                self._statics.popitem(last=False)
        self._statics.move_to_end(key)
        return static

    def _forward(self, s: _Static) -> torch.Tensor:
        """The static step: (B, V) logits; device work only, shapes fixed by (B, S)."""
        cache = self.cache
        live = s.inputs[s.bucket]
        positions = cache.lengths_t[: s.bucket] * (s.rows < live)  # padding rows: position 0
        mask = (s.keys[None, :] <= positions[:, None])[:, None, None, :]  # (B, 1, 1, S)
        rows = Decodes(
            size=s.bucket,
            live=s.bucket,
            t_max=s.span,
            mask=mask,
            slots=s.rows,
            positions=positions,
            live_positions=positions,
        )
        return self.model(Batch(cache, s.inputs[: s.bucket], positions, rows, None, None))

    def _capture(self, s: _Static) -> bool:
        """Capture ``s``'s step. The warm-up runs it once for real on a side stream with this step's
        inputs: it writes the K/V this step writes anyway, so running it again changes nothing."""
        try:
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self._forward(s)
            current.wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self._forward(s)
        except RuntimeError as exc:  # an operation that cannot be captured: stay on the normal path
            self.disabled = f"CUDA graph capture failed: {exc}"
            self.clear()
            warnings.warn(f"{self.disabled}; decoding without CUDA graphs", RuntimeWarning, stacklevel=3)
            return False
        s.graph, s.out = graph, out
        self.counts["captures"] += 1
        return True


def attach(runner, *, capture: bool | None = None) -> DecodeGraphs:
    """Give a decoder-only runner static decode steps (``capture=False``: without graphs, any
    device); returns them. ``detach`` goes back to the normal path."""
    graphs = DecodeGraphs(runner.model, runner.cache, capture=capture)
    runner.decode_graphs = graphs
    return graphs


def detach(runner) -> None:
    graphs = getattr(runner, "decode_graphs", None)
    if graphs is not None:
        graphs.clear()
    runner.decode_graphs = None
