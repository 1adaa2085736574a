"""What every model needs from one forward call: the step's description (``Batch``) and attention
over the shared KV cache (``engine.kv_cache.KVCache``).

A step has up to two parts, in this row order:

- decode rows (``Decodes``): one token for each of the running slots ``0..k-1``, then padding rows
  that cost what a decode row costs and change nothing;
- new sequences (``Prompts``): their tokens packed into one (N, ...) run of rows, written to new
  slots at the end of the cache;
- prompt chunks (``Chunks``, chunked prefill): the next tokens of prompts whose first part is
  already in their slots, each attending over its slot's cache and causally over itself.

Projections and MLPs see all rows together (no padding between sequences); attention is done per
part: prompt rows scatter into (B, Tmax) only for the kernel, with a causal + length mask; decode
rows read each slot's cache up to its own length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from engine.kv_cache import KVCache

PACKED_MIN_WEIGHT = 1 << 16  # smaller matrices (tiny models) lose more to oneDNN's call overhead
PACKED_ROWS = 8  # the row count oneDNN lays packed weights out for (any count runs; see PackedWeight)

M = TypeVar("M", bound=nn.Module)


def _can_pack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or weight.numel() < PACKED_MIN_WEIGHT or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedWeight:
    """``y = x W^T + b``, with W also held in oneDNN's blocked layout on CPU (float32, and bfloat16
    where the CPU has bf16 instructions).

    The weight is reordered once for a few rows (``mkldnn._reorder_linear_weight``) and each call
    is one oneDNN inner product on the dense input (``mkldnn._linear_pointwise``): no conversion of
    inputs and outputs to and from oneDNN tensors. On the CPUs we run on it is the fastest float32
    and bfloat16 path we measured at every row count, from one row (a GEMV streaming the weight
    from memory) to a prefill; see docs/engine.md. Elsewhere (CUDA, float16, small matrices) it is
    ``F.linear``. The dense weight stays the model's parameter.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, pack: bool = True) -> None:
        self.weight, self.bias = weight, bias
        self.packed = None
        if pack and _can_pack(weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACKED_ROWS)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


class Linear(nn.Linear):
    """``nn.Linear`` that can switch to ``PackedWeight`` once its weights are final (``pack_``).

    Weights always come from a checkpoint, so construction leaves them uninitialised."""

    _packed: Callable[[torch.Tensor], torch.Tensor] | None = None  # a PackedWeight, or engine.quant's copy

    def reset_parameters(self) -> None:
        pass

    def pack_(self) -> None:
        self._packed = PackedWeight(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return self._packed(x)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """``nn.Embedding`` left uninitialised at construction (weights come from a checkpoint).
    ``out_dtype``: the rows are returned in it (a table stored in a smaller dtype than the model's)."""

    out_dtype: torch.dtype | None = None

    def reset_parameters(self) -> None:
        pass

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(ids)
        return rows if self.out_dtype is None else rows.to(self.out_dtype)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``model`` computes in (``compute_dtype`` where its tables are stored smaller)."""
    return getattr(model, "compute_dtype", None) or next(model.parameters()).dtype


def pack_linears_(model: M, pack: bool = True) -> M:
    """Pack every ``Linear`` (see ``PackedWeight``) but the row slices of a fused weight (Llama's
    q/k/v and gate/up after ``fuse_``): the fused weight is what runs, the slices keep F.linear.
    ``pack`` False: nothing is packed (a quantized copy will run instead)."""
    if not pack:
        return model
    fused = {w.untyped_storage().data_ptr() for w in fused_weights(model)}
    for module in model.modules():
        if isinstance(module, Linear) and module.weight.untyped_storage().data_ptr() not in fused:
            module.pack_()
    return model


def fused_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights of the ``PackedWeight``s a model's modules hold besides their ``Linear``s' own
    (Llama's fused q/k/v and gate/up)."""
    return [
        value.weight
        for module in model.modules()
        for name, value in vars(module).items()
        if isinstance(value, PackedWeight) and not (isinstance(module, Linear) and name == "_packed")
    ]


@dataclass
class Prompts:
    """A step's new sequences: tokens packed, sequence ``i`` written to slot ``first_slot + i``."""

    first_slot: int
    size: int  # B
    t_max: int  # longest sequence
    mask: torch.Tensor | None  # (B, 1, T, T) causal + length / (B, 1, 1, T) length; None when lengths are equal
    pad_b: torch.Tensor  # (N,) sequence of each packed token
    pad_t: torch.Tensor  # (N,) position of each packed token
    last_index: torch.Tensor  # (B,) packed index of each sequence's last token
    input_ids: torch.Tensor  # (N,)

    @staticmethod
    def add(cache: KVCache, seqs: list[list[int]], device: torch.device, *, causal: bool) -> Prompts:
        """New slots in ``cache`` holding ``len(seq)`` positions each (the model writes them)."""
        lens = [len(s) for s in seqs]
        first = cache.add_slots(lens)
        b, t_max = len(seqs), max(lens)
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
        pad_b = torch.repeat_interleave(torch.arange(b), torch.tensor(lens))
        pad_t = torch.cat([torch.arange(n) for n in lens])
        last = torch.cumsum(torch.tensor(lens), 0) - 1
        mask = None
        if min(lens) != t_max:
            valid = torch.arange(t_max)[None, :] < torch.tensor(lens)[:, None]  # (B, T) keys
            mask = valid[:, None, None, :]  # (B, 1, 1, T)
            if causal:
                mask = mask & torch.ones(t_max, t_max, dtype=torch.bool).tril()[None, None]
            mask = mask.to(device)
        return Prompts(first, b, t_max, mask, pad_b.to(device), pad_t.to(device), last.to(device), ids.to(device))


@dataclass
class Decodes:
    """A step's decode rows: one token for each of slots ``0..live-1``, written at the slot's own
    position, then ``size - live`` padding rows. Padding row ``i`` attends over all ``t_max``
    positions of slot ``i`` (whatever they hold: its result is thrown away) and writes nothing, so
    it costs what a decode row at the longest context costs and changes no request."""

    size: int  # rows, padding included
    live: int  # k
    t_max: int  # longest context a row attends over, its own token included
    mask: torch.Tensor | None  # (size, 1, 1, T) keys each row sees; None: all of them
    slots: torch.Tensor  # (k,) 0..k-1
    positions: torch.Tensor  # (size,) position of each row's token (padding rows: t_max - 1)
    live_positions: torch.Tensor  # (k,) where the live rows' k/v go
    first: int = 0  # row i is slot first + i (a pipeline's decode micro-batch: a run of slots)

    @staticmethod
    def make(cache: KVCache, live: int, padding: int, first: int = 0) -> Decodes:
        """Rows for slots ``first..first+live-1`` plus ``padding``; makes room for them in ``cache``."""
        size = live + padding
        lengths = cache.lengths[first : first + live] or cache.lengths or [0]  # padding alone: the longest
        t_max = max(lengths) + 1
        cache.reserve(max(cache.size, first + size), t_max)
        live_positions = cache.lengths_t[first : first + live]
        positions = live_positions
        if padding:
            positions = torch.cat([live_positions, torch.full((padding,), t_max - 1, device=cache.device)])
        mask = None
        if live and min(cache.lengths[first : first + live]) + 1 != t_max:
            keys = torch.arange(t_max, device=cache.device)
            mask = (keys[None, :] <= positions[:, None])[:, None, None, :]  # (size, 1, 1, T)
        slots = torch.arange(first, first + live, device=cache.device)
        return Decodes(size, live, t_max, mask, slots, positions, live_positions, first)


@dataclass
class Chunks:
    """A step's prompt chunks: chunk ``i`` is ``lengths[i]`` tokens written to slot ``slots[i]``
    from position ``starts[i]`` (the positions before it already cached), its tokens packed."""

    slots: list[int]
    starts: list[int]
    lengths: list[int]
    masks: list[torch.Tensor]  # (n, start + n) keys each of the chunk's tokens sees
    positions: torch.Tensor  # (N,)
    last_index: torch.Tensor  # (C,) packed index of each chunk's last token
    input_ids: torch.Tensor  # (N,)

    @staticmethod
    def make(cache: KVCache, chunks: Sequence[tuple[int, list[int]]], device: torch.device) -> Chunks:
        """Rows for ``(slot, tokens)`` chunks; makes room for them in ``cache`` (lengths unchanged
        until the step succeeds: ``KVCache.extend``)."""
        slots = [slot for slot, _ in chunks]
        starts = [cache.lengths[slot] for slot in slots]
        lengths = [len(tokens) for _, tokens in chunks]
        cache.reserve(cache.size, max(a + n for a, n in zip(starts, lengths)))
        masks = [
            (torch.arange(a + n, device=device)[None, :] <= torch.arange(a, a + n, device=device)[:, None])
            for a, n in zip(starts, lengths)
        ]
        positions = torch.cat([torch.arange(a, a + n) for a, n in zip(starts, lengths)])
        last = torch.cumsum(torch.tensor(lengths), 0) - 1
        ids = torch.tensor([t for _, tokens in chunks for t in tokens], dtype=torch.int64)
        return Chunks(slots, starts, lengths, masks, positions.to(device), last.to(device), ids.to(device))


@dataclass
class Batch:
    """One forward pass over ``cache``: the decode rows first, then the new sequences' packed tokens,
    then the prompt chunks' packed tokens."""

    cache: KVCache
    input_ids: torch.Tensor  # (R,) R = decode rows + packed prompt tokens + packed chunk tokens
    positions: torch.Tensor  # (R,) position of each token in its sequence
    decodes: Decodes | None
    prompts: Prompts | None
    # rows the LM head reads: decode rows, each new sequence's last token, each chunk's last; None: all
    logit_rows: torch.Tensor | None
    chunks: Chunks | None = None

    @staticmethod
    def prefill(cache: KVCache, prompts: list[list[int]], device: torch.device, *, causal: bool = True) -> Batch:
        """New sequences only."""
        part = Prompts.add(cache, prompts, device, causal=causal)
        return Batch(cache, part.input_ids, part.pad_t, None, part, part.last_index)

    @staticmethod
    def decode(cache: KVCache, last_tokens: torch.Tensor) -> Batch:
        """One token for every live slot: last_tokens (B,)."""
        part = Decodes.make(cache, cache.size, 0)
        return Batch(cache, last_tokens, part.positions, part, None, None)

    @staticmethod
    def decode_run(cache: KVCache, last_tokens: torch.Tensor, first: int, padding: int = 0) -> Batch:
        """One token for each of slots ``first..first+k-1`` (last_tokens (k,)), plus ``padding``."""
        part = Decodes.make(cache, last_tokens.shape[0], padding, first)
        return Batch(cache, _pad_ids(last_tokens, padding), part.positions, part, None, None)

    @staticmethod
    def step(
        cache: KVCache,
        last_tokens: torch.Tensor,
        padding: int,
        prompts: list[list[int]],
        device: torch.device,
        *,
        causal: bool = True,
        chunks: Sequence[tuple[int, list[int]]] = (),
    ) -> Batch:
        """Decode rows for slots ``0..k-1`` (last_tokens (k,)) plus ``padding``, new sequences, and
        ``(slot, tokens)`` prompt chunks."""
        if chunks:
            return Batch._with_chunks(cache, last_tokens, padding, prompts, device, list(chunks))
        live = last_tokens.shape[0]
        if not prompts:
            if live == cache.size and not padding:
                return Batch.decode(cache, last_tokens)
            part = Decodes.make(cache, live, padding)
            return Batch(cache, _pad_ids(last_tokens, padding), part.positions, part, None, None)
        if not live and not padding:
            return Batch.prefill(cache, prompts, device, causal=causal)
        dec = Decodes.make(cache, live, padding)
        new = Prompts.add(cache, prompts, device, causal=causal)
        ids = torch.cat([_pad_ids(last_tokens, padding), new.input_ids])
        rows = torch.cat([torch.arange(dec.size, device=device), dec.size + new.last_index])
        return Batch(cache, ids, torch.cat([dec.positions, new.pad_t]), dec, new, rows)

    @staticmethod
    def _with_chunks(
        cache: KVCache,
        last_tokens: torch.Tensor,
        padding: int,
        prompts: list[list[int]],
        device: torch.device,
        chunks: list[tuple[int, list[int]]],
    ) -> Batch:
        live = last_tokens.shape[0]
        dec = Decodes.make(cache, live, padding) if live or padding else None
        new = Prompts.add(cache, prompts, device, causal=True) if prompts else None
        part = Chunks.make(cache, chunks, device)
        ids, positions, rows, at = [], [], [], 0
        if dec is not None:
            ids.append(_pad_ids(last_tokens, padding))
            positions.append(dec.positions)
            rows.append(torch.arange(dec.size, device=device))
            at = dec.size
        if new is not None:
            ids.append(new.input_ids)
            positions.append(new.pad_t)
            rows.append(at + new.last_index)
            at += new.input_ids.shape[0]
        ids.append(part.input_ids)
        positions.append(part.positions)
        rows.append(at + part.last_index)
        return Batch(cache, torch.cat(ids), torch.cat(positions), dec, new, torch.cat(rows), part)


def _pad_ids(last_tokens: torch.Tensor, padding: int) -> torch.Tensor:
    """(k,) -> (k + padding,): padding rows read token 0."""
    if not padding:
        return last_tokens
    return torch.cat([last_tokens, last_tokens.new_zeros(padding)])


def to_padded(x: torch.Tensor, part: Prompts) -> torch.Tensor:
    """(N, heads, D) packed -> (B, heads, T, D)."""
    if part.size == 1:
        return x.transpose(0, 1).unsqueeze(0)
    out = x.new_zeros(part.size, part.t_max, x.shape[1], x.shape[2])
    out[part.pad_b, part.pad_t] = x
    return out.transpose(1, 2)


def to_packed(y: torch.Tensor, part: Prompts) -> torch.Tensor:
    """(B, heads, T, D) -> (N, heads, D)."""
    if part.size == 1:
        return y[0].transpose(0, 1)
    return y.transpose(1, 2)[part.pad_b, part.pad_t]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    batch: Batch,
    *,
    scale: float | None = None,
    decode_bias: torch.Tensor | None = None,
    prompt_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention for every row of ``batch``: q (R, H, D), k/v (R, Hkv, D) -> (R, H, D).

    Decode rows attend over their slots' caches, prompt rows over their own sequence; each part
    writes its k/v into the cache. The optional additive biases (T5's relative positions) replace
    the parts' masks, so they must hold them (see ``attend_prefill``, ``attend_decode``)."""
    if batch.chunks is not None:
        return _attend_parts(q, k, v, layer, batch, scale, decode_bias, prompt_bias)
    if batch.prompts is None:
        return attend_decode(q, k, v, layer, batch, scale=scale, bias=decode_bias)
    if batch.decodes is None:
        return attend_prefill(q, k, v, layer, batch, causal=True, scale=scale, bias=prompt_bias)
    n = batch.decodes.size
    return torch.cat(
        [
            attend_decode(q[:n], k[:n], v[:n], layer, batch, scale=scale, bias=decode_bias),
            attend_prefill(q[n:], k[n:], v[n:], layer, batch, causal=True, scale=scale, bias=prompt_bias),
        ]
    )


def _attend_parts(q, k, v, layer: int, batch: Batch, scale, decode_bias, prompt_bias) -> torch.Tensor:
    """``attend`` for a step with prompt chunks: decode rows, prompt rows, chunk rows in turn."""
    out, at = [], 0
    if batch.decodes is not None:
        n = batch.decodes.size
        out.append(attend_decode(q[:n], k[:n], v[:n], layer, batch, scale=scale, bias=decode_bias))
        at = n
    if batch.prompts is not None:
        n = batch.prompts.input_ids.shape[0]
        out.append(
            attend_prefill(
                q[at : at + n], k[at : at + n], v[at : at + n], layer, batch, causal=True, scale=scale, bias=prompt_bias
            )
        )
        at += n
    out.append(attend_chunks(q[at:], k[at:], v[at:], layer, batch, scale=scale))
    return torch.cat(out)


def attend_chunks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: Batch, *, scale: float | None = None
) -> torch.Tensor:
    """Chunk rows: q (N, H, D), k/v (N, Hkv, D) -> (N, H, D). Each chunk writes its k/v after its
    slot's cached positions and attends over all of them, causally over its own tokens."""
    part, cache, out, at = batch.chunks, batch.cache.kv, [], 0
    assert part is not None  # called for a step with chunks only
    for slot, start, n, mask in zip(part.slots, part.starts, part.lengths, part.masks):
        end = start + n
        cache[layer, 0, slot, :, start:end] = k[at : at + n].transpose(0, 1)  # (Hkv, n, D)
        cache[layer, 1, slot, :, start:end] = v[at : at + n].transpose(0, 1)
        keys, values = cache[layer, 0, slot, :, :end][None], cache[layer, 1, slot, :, :end][None]  # (1, Hkv, T, D)
        y = F.scaled_dot_product_attention(
            q[at : at + n].transpose(0, 1)[None],
            keys,
            values,
            attn_mask=mask,
            enable_gqa=q.shape[1] != k.shape[1],
            scale=scale,
        )  # (1, H, n, D)
        out.append(y[0].transpose(0, 1))
        at += n
    return torch.cat(out)


def attend_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    batch: Batch,
    *,
    causal: bool,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prompt rows: q (N, H, D), k/v (N, Hkv, D) -> (N, H, D); writes k/v into the new slots.

    ``bias``: an additive (B or 1, H, T, T) float term that replaces the part's causal and length
    masks (fold them in: -inf where a key is hidden)."""
    part = batch.prompts
    assert part is not None  # called for a step with new sequences only
    qp, kp, vp = to_padded(q, part), to_padded(k, part), to_padded(v, part)  # (B, h, T, D)
    s0, t = part.first_slot, part.t_max
    batch.cache.kv[layer, 0, s0 : s0 + part.size, :, :t] = kp
    batch.cache.kv[layer, 1, s0 : s0 + part.size, :, :t] = vp
    mask, is_causal = part.mask, causal and part.mask is None
    if bias is not None:
        mask, is_causal = bias, False
    y = F.scaled_dot_product_attention(
        qp, kp, vp, attn_mask=mask, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1], scale=scale
    )
    return to_packed(y, part)


def attend_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    batch: Batch,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode rows: q (B, H, D), k/v (B, Hkv, D) -> (B, H, D); live rows append k/v at their slot's
    own position, padding rows write nothing. ``bias``: an additive (B, H, 1, T) float term that
    replaces the part's length mask (fold it in)."""
    part = batch.decodes
    assert part is not None  # called for a step with decode rows only
    b, h, d = q.shape
    hkv = k.shape[1]
    cache = batch.cache.kv
    if part.live < b:
        k, v = k[: part.live], v[: part.live]
    if part.mask is None:  # every live row writes position t_max - 1: a strided store, no index tensors
        live = slice(part.first, part.first + part.live)
        cache[layer, 0, live, :, part.t_max - 1] = k
        cache[layer, 1, live, :, part.t_max - 1] = v
    else:
        cache[layer, 0][part.slots, :, part.live_positions] = k
        cache[layer, 1][part.slots, :, part.live_positions] = v
    keys = cache[layer, 0, part.first : part.first + b, :, : part.t_max]  # (B, Hkv, T, D)
    values = cache[layer, 1, part.first : part.first + b, :, : part.t_max]
    if bias is not None:  # T5: SDPA takes the additive bias in its kernel
        y = F.scaled_dot_product_attention(
            q[:, :, None], keys, values, attn_mask=bias, scale=scale, enable_gqa=h != hkv
        )  # (B, H, 1, D)
        return y[:, :, 0]
    # query heads sharing one kv head become that head's query rows: no copy of the cache for GQA.
    # One query row per head is too small for SDPA's kernels to pay off; two matmuls are faster.
    qg = q.view(b, hkv, h // hkv, d)  # (B, Hkv, G, D)
    if q.device.type == "cpu" and q.dtype != torch.float32:
        # CPU bf16/fp16 matmuls of these small shapes are slower than converting to float32 first
        qg, keys, values = qg.float(), keys.float(), values.float()
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * (d**-0.5 if scale is None else scale)  # (B, Hkv, G, T)
    if part.mask is not None:
        scores = scores.masked_fill(~part.mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(b, h, d).to(q.dtype)  # (B, Hkv, G, D) -> (B, H, D)
