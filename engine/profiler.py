"""Time one layer of our engine on the local device, in the reference profiles' JSONL format.

Split rows (like ``profiles/h200-reference-split.jsonl``): ``part: rest`` by ``tokens`` (norms,
projections, MLP), ``attn_prefill`` (T5: ``attn_encode``) by ``batch`` x ``seq`` (the attention
kernel incl. the KV write), ``attn_decode`` by ``batch`` x ``ctx``. Layer rows (like
``h200-reference-layers.jsonl``): ``phase: prefill`` (T5: ``encode``) by batch x seq and ``phase:
decode`` by batch x ctx (T5: also ``enc_seq``, the cross-attention length), the whole layer.
``rest(tokens)`` is measured as a decode step of ``tokens`` sequences over one cached key minus
that step's attention (T5: self- and cross-attention), so the split adds up by construction.
Both files also get ``part: step`` rows by ``rows`` (decoder-only models): a real engine decode
step over that many requests minus its layers, i.e. the LM head, sampling and the engine's own
work per step, which the optimizer charges to the last pipeline stage.

T5: the encoder layer is timed with one decoder layer's cross-attention K/V projection (the
encoder writes it once per decoder layer); the decoder layer with self-attention over ``ctx``
decoder positions and cross-attention over ``enc_seq`` encoder positions. Cross-attention alone
is costed by the optimizer as ``attn_decode`` at the encoder length, as in the reference files.

The grid (``build_grid``) is geometric: batches 1, 2, 4, ... up to ``max_batch``, lengths 16, 32,
... up to ``max_len``; rest-of-layer and whole-layer prefill cells stop at ``max_tokens`` tokens
(they are close to linear in tokens, so the optimizer extrapolates them safely), attention cells
at ``ATTENTION_TOKENS x max_tokens`` (attention alone is cheaper, and grows faster than linearly
in the length, so it is measured further). Whole-layer cells use every other point (x4 steps).

Tensor parallelism (``tp_degrees``): for each degree k > 1 the same split and whole-layer rows,
labelled ``tp: k``, are measured on the model cut to TP rank 0 of k in this process
(``engine.parallel.shard.shard_tp`` without a group: the row-parallel projections skip their
all-reduce), so a row holds one rank's compute only; the optimizer charges the all-reduces from
the cluster's link. Rank 0 holds the larger share when heads or FFN units do not divide evenly.
``step`` rows at tp=k repeat the tp=1 measurement: the LM head, sampling and the engine's work run
unsharded on the last stage's TP rank 0.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine.kv_cache import KVCache
from engine.models.common import Batch, Prompts, attend_decode, attend_prefill, model_dtype, to_packed, to_padded

if TYPE_CHECKING:
    from engine.models import Model, gpt, llama, t5

MIN_LEN = 16  # shortest prompt / context profiled; shorter ones cost the same to within noise
ATTENTION_TOKENS = 16  # attention cells reach this many times max_tokens tokens
CELL_BUDGET_S = 0.5  # timed calls of one cell stop after this much time once MIN_SAMPLES are in
MIN_SAMPLES = 3


def geometric(lo: int, hi: int, step: int = 2) -> tuple[int, ...]:
    """lo, lo*step, lo*step^2, ... below hi, then hi itself."""
    out = []
    x = lo
    while x < hi:
        out.append(x)
        x *= step
    return tuple(out + [hi])


@dataclass(frozen=True)
class Grid:
    tokens: tuple[int, ...] = (1, 4, 16, 64, 256)  # rest of the layer, by tokens in a step
    prefill: tuple[tuple[int, int], ...] = ((1, 32), (1, 128), (4, 32), (4, 128))  # attention (batch, seq)
    decode: tuple[tuple[int, int], ...] = ((1, 128), (8, 128), (8, 512), (32, 128), (32, 512))  # (batch, ctx)
    layer_prefill: tuple[tuple[int, int], ...] | None = None  # whole-layer cells; None: as ``prefill``
    layer_decode: tuple[tuple[int, int], ...] | None = None  # None: as ``decode``
    enc_seqs: tuple[int, ...] = ()  # T5 decode layers: encoder lengths; () -> the longest prefill seq
    step_rows: tuple[int, ...] = ()  # per-step work besides the layers, by rows that get logits


def _rows(batches: tuple[int, ...], lengths: tuple[int, ...], budget: int) -> tuple[tuple[int, int], ...]:
    """(batch, length) cells within ``budget`` tokens; a batch with fewer than two lengths is left
    out (a row needs two points to be interpolated)."""
    out: list[tuple[int, int]] = []
    for b in batches:
        row = [(b, n) for n in lengths if b * n <= budget]
        out += row if len(row) >= 2 else []
    return tuple(out)


def build_grid(max_batch: int = 64, max_len: int = 1024, max_tokens: int = 4096) -> Grid:
    """The profile grid that spans batches up to ``max_batch`` and prompts and contexts up to
    ``max_len`` (see the module docstring)."""
    if max_batch < 2 or max_len < 2 * MIN_LEN or max_tokens < 4 * MIN_LEN:
        raise ValueError(
            f"a profile grid needs max_batch >= 2, max_len >= {2 * MIN_LEN} and max_tokens >= "
            f"{4 * MIN_LEN}, got {max_batch}, {max_len} and {max_tokens}"
        )
    batches, lengths = geometric(1, max_batch), geometric(MIN_LEN, max_len)
    attention = ATTENTION_TOKENS * max_tokens
    layer_batches, layer_lengths = geometric(1, max_batch, 4), geometric(MIN_LEN, max_len, 4)
    return Grid(
        tokens=geometric(1, max_tokens),
        prefill=_rows(batches, lengths, attention),
        decode=_rows(batches, lengths, attention),
        layer_prefill=_rows(layer_batches, layer_lengths, max_tokens),
        layer_decode=_rows(layer_batches, layer_lengths, attention),
        enc_seqs=layer_lengths,
        step_rows=batches,
    )


def quick_grid(max_len: int = 1024) -> Grid:
    """Two points per axis (the least the optimizer accepts), spanning lengths up to ``max_len``."""
    cells = ((1, MIN_LEN), (1, max_len), (2, MIN_LEN), (2, max_len))
    return Grid(tokens=(1, 16), prefill=cells, decode=cells, enc_seqs=(max_len,), step_rows=(1, 2))


def _random(*shape: int, like: LayerProbe) -> torch.Tensor:
    return torch.randn(*shape, device=like.device, dtype=like.dtype)


class LayerProbe:
    """Layer 0 of a loaded decoder-only model (llama, opt, gpt2), on a one-layer cache."""

    prefill_phase, prefill_part = "prefill", "attn_prefill"
    model: Model  # decoder-only (``T5Probe``: a T5)

    def __init__(self, model: Model, device: torch.device) -> None:
        self.model = model
        self.device = torch.device(device)
        self.dtype = model_dtype(self.model)
        _, kv_heads, self.head_dim = self.model.cache_geometry()
        # a TP shard's cache holds only its own kv heads (cache_geometry() stays the full model's)
        self.kv_heads = getattr(self.model, "local_kv_heads", kv_heads)
        self.hidden = self._hidden()
        self.heads = self._attention().n_head  # query heads this model (or TP shard) computes

    def _hidden(self) -> int:
        assert self.model.kind != "t5"  # T5Probe's own
        return self.model.args.hidden_size

    def _attention(self) -> llama.Attention | gpt.Attention | t5.Attention:
        if self.model.kind == "llama":
            return self.model.model.at(0).self_attn
        assert self.model.kind != "t5"  # T5Probe's own
        return self.model.model.decoder.at(0).self_attn

    def _cache(self, batch: int, ctx: int) -> KVCache:
        cache = KVCache(1, self.kv_heads, self.head_dim, dtype=self.dtype, device=self.device, max_context=ctx + 1)
        cache.add_slots([ctx] * batch)
        cache.reserve(batch, ctx + 1)
        return cache

    def _decode_batch(self, b: int, ctx: int) -> Batch:
        return Batch.decode(self._cache(b, ctx), torch.zeros(b, dtype=torch.int64, device=self.device))

    def _prefill_batch(self, b: int, seq: int) -> Batch:
        cache = KVCache(1, self.kv_heads, self.head_dim, dtype=self.dtype, device=self.device, max_context=seq)
        return Batch.prefill(cache, [[0] * seq] * b, self.device)

    def _block(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """One layer's forward; successive calls take the model's layers in turn (their weights on
        a one-layer cache), so weights come from memory as they do in a real step, not from a
        cache that one layer timed over and over would keep warm."""
        assert self.model.kind != "t5"  # T5Probe's blocks are its own
        layers = self.model.model.layers if self.model.kind == "llama" else self.model.model.decoder.layers
        self._turn = (getattr(self, "_turn", -1) + 1) % len(layers)
        if self.model.kind == "llama":
            cos, sin = self.model._rope_at(batch.positions)
            return layers[self._turn](x, 0, batch, cos, sin)
        return layers[self._turn](x, 0, batch)

    def _qkv(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            _random(n, self.heads, self.head_dim, like=self),
            _random(n, self.kv_heads, self.head_dim, like=self),
            _random(n, self.kv_heads, self.head_dim, like=self),
        )

    def prefill_layer(self, b: int, seq: int) -> Callable[[], object]:
        batch = self._prefill_batch(b, seq)
        x = _random(b * seq, self.hidden, like=self)
        return lambda: self._block(x, batch)

    def decode_layer(self, b: int, ctx: int, enc_seq: int = 0) -> Callable[[], object]:
        batch = self._decode_batch(b, ctx)
        x = _random(b, self.hidden, like=self)
        return lambda: self._block(x, batch)

    def attn_prefill(self, b: int, seq: int) -> Callable[[], object]:
        batch = self._prefill_batch(b, seq)
        q, k, v = self._qkv(b * seq)
        return lambda: attend_prefill(q, k, v, 0, batch, causal=True)

    def attn_decode(self, b: int, ctx: int) -> Callable[[], object]:
        batch = self._decode_batch(b, ctx)
        q, k, v = self._qkv(b)
        return lambda: attend_decode(q, k, v, 0, batch)

    def attention_in_decode(self, b: int) -> list[Callable[[], object]]:
        """The attention calls inside ``decode_layer(b, 1)`` (what ``rest`` leaves out)."""
        return [self.attn_decode(b, 1)]


class T5Probe(LayerProbe):
    """Encoder block 0 and decoder block 0 of a loaded T5. The block bodies mirror ``T5.encode``
    and ``T5.decode`` (a block there is a loop body, not a module call)."""

    prefill_phase, prefill_part = "encode", "attn_encode"
    model: t5.T5

    def _hidden(self) -> int:
        return self.model.args.d_model

    def _attention(self) -> t5.Attention:
        return self.model.encoder.at(0).self_attention.SelfAttention

    def _encoder_bias(self, seq: int) -> torch.Tensor:
        pos = torch.arange(seq, device=self.device)
        bias = self.model.encoder.position_bias(pos[None, :] - pos[:, None], self.model.args, bidirectional=True)
        return bias[None].to(self.dtype)  # (1, H, S, S)

    def _encoder_block(self, x: torch.Tensor, part: Prompts, bias: torch.Tensor, cache: KVCache) -> torch.Tensor:
        block = self.model.encoder.at(0)
        sa, ff = block.self_attention, block.feed_forward
        att = sa.SelfAttention
        h = sa.layer_norm(x)
        q, k, v = (to_padded(att.heads(p, h), part) for p in (att.q, att.k, att.v))  # (B, H, S, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        x = x + att.o(to_packed(y, part).reshape(x.shape[0], -1))
        x = x + ff.DenseReluDense(ff.layer_norm(x))
        cross = self.model.decoder.at(0).cross_attention.EncDecAttention  # this layer's share of the cross K/V
        cache.kv[0, 0, : part.size, :, : part.t_max] = to_padded(cross.heads(cross.k, x), part)
        cache.kv[0, 1, : part.size, :, : part.t_max] = to_padded(cross.heads(cross.v, x), part)
        return x

    def _encode_setup(self, b: int, seq: int) -> tuple[Prompts, torch.Tensor, KVCache]:
        cache = KVCache(1, self.kv_heads, self.head_dim, dtype=self.dtype, device=self.device, max_context=seq)
        part = Prompts.add(cache, [[0] * seq] * b, self.device, causal=False)
        return part, self._encoder_bias(seq), cache

    def prefill_layer(self, b: int, seq: int) -> Callable[[], object]:
        part, bias, cache = self._encode_setup(b, seq)
        x = _random(b * seq, self.hidden, like=self)
        return lambda: self._encoder_block(x, part, bias, cache)

    def attn_prefill(self, b: int, seq: int) -> Callable[[], object]:
        part, bias, _ = self._encode_setup(b, seq)
        q, k, v = self._qkv(b * seq)

        def run() -> torch.Tensor:
            qp, kp, vp = to_padded(q, part), to_padded(k, part), to_padded(v, part)
            return to_packed(F.scaled_dot_product_attention(qp, kp, vp, attn_mask=bias, scale=1.0), part)

        return run

    def _cross(self, b: int, enc_seq: int, batch: Batch):
        from engine.models.t5 import _cross_parts

        cache = KVCache(1, self.kv_heads, self.head_dim, dtype=self.dtype, device=self.device, max_context=enc_seq)
        cache.add_slots([enc_seq] * b)
        return cache, _cross_parts(batch, cache)

    def _decoder_block(
        self, x: torch.Tensor, batch: Batch, bias: torch.Tensor | None, cross: KVCache, parts
    ) -> torch.Tensor:
        from engine.models.t5 import _attend_cross

        block = self.model.decoder.at(0)
        sa, ca, ff = block.self_attention, block.cross_attention, block.feed_forward
        att, xa = sa.SelfAttention, ca.EncDecAttention
        h = sa.layer_norm(x)
        q, k, v = (att.heads(p, h) for p in (att.q, att.k, att.v))  # (B, H, D)
        x = x + att.o(attend_decode(q, k, v, 0, batch, scale=1.0, bias=bias).reshape(x.shape[0], -1))
        q = xa.heads(xa.q, ca.layer_norm(x))
        x = x + xa.o(_attend_cross(q, cross.kv[0], parts).reshape(x.shape[0], -1))
        return x + ff.DenseReluDense(ff.layer_norm(x))

    def decode_layer(self, b: int, ctx: int, enc_seq: int = 0) -> Callable[[], object]:
        batch = self._decode_batch(b, ctx)
        bias, _ = self.model._self_biases(batch)
        cross, parts = self._cross(b, max(enc_seq, 1), batch)
        x = _random(b, self.hidden, like=self)
        return lambda: self._decoder_block(x, batch, bias, cross, parts)

    def attn_decode(self, b: int, ctx: int) -> Callable[[], object]:
        batch = self._decode_batch(b, ctx)
        bias, _ = self.model._self_biases(batch)
        q, k, v = self._qkv(b)
        return lambda: attend_decode(q, k, v, 0, batch, scale=1.0, bias=bias)

    def attn_cross(self, b: int, enc_seq: int) -> Callable[[], object]:
        from engine.models.t5 import _attend_cross

        cross, parts = self._cross(b, enc_seq, self._decode_batch(b, 1))
        q = _random(b, self.heads, self.head_dim, like=self)
        return lambda: _attend_cross(q, cross.kv[0], parts)

    def attention_in_decode(self, b: int) -> list[Callable[[], object]]:
        return [self.attn_decode(b, 1), self.attn_cross(b, 1)]


def probe_for(engine) -> LayerProbe:
    return probe_of(engine.runner.model, torch.device(engine.device))


def probe_of(model: Model, device: torch.device) -> LayerProbe:
    return T5Probe(model, device) if model.kind == "t5" else LayerProbe(model, device)


def load_shard(model: str, tp: int, *, dtype: torch.dtype, device: torch.device, models_dir=None) -> Model:
    """``model`` (a name as for ``load_engine``) cut to TP rank 0 of ``tp``, in this process: its
    row-parallel projections have no group, so a layer computes exactly that rank's share."""
    from engine import read_checkpoint
    from engine.loading import build_model, load_state
    from engine.parallel.shard import shard_tp

    model_type, config, state, _ = read_checkpoint(model, models_dir)
    return load_state(build_model(model_type, config), state, dtype, device, prepare=lambda m: shard_tp(m, tp, 0, None))


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, budget_s: float = CELL_BUDGET_S) -> float:
    """Median wall time of ``fn`` in milliseconds: one warm-up call (two when it is quick), then up
    to ``repeats`` timed calls, ending early once ``MIN_SAMPLES`` are in and ``budget_s`` is spent."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once() -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    with torch.inference_mode():
        if once() < budget_s / 10:
            once()
        samples: list[float] = []
        while len(samples) < repeats and (len(samples) < min(MIN_SAMPLES, repeats) or sum(samples) < budget_s):
            samples.append(once())
    return statistics.median(samples) * 1e3


def profile_rows(
    engine, model: str, grid: Grid | None = None, repeats: int = 5, *, tp_degrees: Iterable[int] = (1,), models_dir=None
) -> tuple[list[dict], list[dict]]:
    """(split rows, layer rows) for ``engine``'s model over ``grid`` (default ``build_grid()``),
    labelled ``model``, at tp 1 and each degree of ``tp_degrees`` (see the module docstring; the
    shards are read again from ``engine.model_name`` and ``models_dir``), as measured (the caller
    applies the noise rule, ``optimizer.profile.smooth_rows``, before writing)."""
    grid = grid or build_grid()
    probe = probe_for(engine)
    t = lambda fn: time_ms(fn, probe.device, repeats)  # noqa: E731
    split, layers = _layer_rows(probe, grid, t, {"model": model, "tp": 1})
    steps: list[dict] = []
    if not isinstance(probe, T5Probe):
        steps = [
            {"model": model, "tp": 1, "part": "step", "rows": n, "ms": step_ms(engine, probe, n, t)}
            for n in grid.step_rows
        ]
    split, layers = split + steps, layers + steps
    for k in sorted(set(tp_degrees) - {1}):
        shard = load_shard(engine.model_name, k, dtype=probe.dtype, device=probe.device, models_dir=models_dir)
        k_split, k_layers = _layer_rows(probe_of(shard, probe.device), grid, t, {"model": model, "tp": k})
        del shard
        k_steps = [{**row, "tp": k} for row in steps]
        split, layers = split + k_split + k_steps, layers + k_layers + k_steps
    return split, layers


def _layer_rows(
    probe: LayerProbe, grid: Grid, t: Callable[[Callable[[], object]], float], base: dict
) -> tuple[list[dict], list[dict]]:
    """The split rows and whole-layer rows of one probe (no ``step`` rows), each with ``base``."""
    split: list[dict] = []
    for n in grid.tokens:
        rest = t(probe.decode_layer(n, 1, 1)) - sum(t(fn) for fn in probe.attention_in_decode(n))
        split.append({**base, "part": "rest", "tokens": n, "ms": max(rest, 0.0)})
    for b, seq in grid.prefill:
        split.append({**base, "part": probe.prefill_part, "batch": b, "seq": seq, "ms": t(probe.attn_prefill(b, seq))})
    for b, ctx in grid.decode:
        split.append({**base, "part": "attn_decode", "batch": b, "ctx": ctx, "ms": t(probe.attn_decode(b, ctx))})
    layers = [
        {**base, "phase": probe.prefill_phase, "batch": b, "seq": seq, "ms": t(probe.prefill_layer(b, seq))}
        for b, seq in grid.layer_prefill or grid.prefill
    ]
    decode_cells = grid.layer_decode or grid.decode
    if isinstance(probe, T5Probe):
        enc_seqs = grid.enc_seqs or (max(s for _, s in grid.layer_prefill or grid.prefill),)
        layers += [
            {**base, "phase": "decode", "batch": b, "ctx": ctx, "enc_seq": e, "ms": t(probe.decode_layer(b, ctx, e))}
            for e in enc_seqs
            for b, ctx in decode_cells
        ]
    else:
        layers += [
            {**base, "phase": "decode", "batch": b, "ctx": ctx, "ms": t(probe.decode_layer(b, ctx))}
            for b, ctx in decode_cells
        ]
    return split, layers


def step_ms(engine, probe: LayerProbe, rows: int, t: Callable[[Callable[[], object]], float]) -> float:
    """What an engine step costs besides its layers (the LM head, sampling, the engine's own
    work, the masks of a batch whose requests differ in length), for ``rows`` sequences: a real
    ``decode_step`` over ``rows`` running requests with contexts spread over MIN_LEN..4 x MIN_LEN,
    minus that many layers' decode time at their mean context."""
    from engine.api import GenerationRequest, SamplingParams

    layers = engine.runner.model.cache_geometry()[0]
    lengths = [MIN_LEN + (3 * MIN_LEN * i) // max(rows - 1, 1) for i in range(rows)]
    params = SamplingParams(max_tokens=max(engine.max_context - 4 * MIN_LEN - 1, 1), ignore_eos=True)
    requests = [GenerationRequest(f"profile-step-{i}", tuple(range(1, n + 1)), params) for i, n in enumerate(lengths)]
    with torch.inference_mode():
        engine.prefill(requests)
    try:
        whole = t(engine.decode_step)
    finally:
        for request in requests:
            engine.abort(request.request_id)
    mean = round(sum(lengths) / rows)
    return max(whole - layers * t(probe.decode_layer(rows, mean)), 0.0)


def header(engine) -> dict:
    threads = torch.get_num_threads()
    device = torch.cuda.get_device_name(0) if engine.device.startswith("cuda") else f"cpu x{threads} threads"
    dtype = str(model_dtype(engine.runner.model))
    return {
        "device": device,
        "torch": torch.__version__,
        "dtype": dtype,
        "threads": threads,
        "kind": "exegpt engine, one layer",
    }


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
