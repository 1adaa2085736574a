"""What every decoder-only model needs from one forward call: the batch description and attention
over the shared KV cache (``engine.kv_cache.KVCache``).

Prefill packs the new prompts' tokens into one (N, ...) tensor, so projections and MLPs see no
padding; attention scatters them into (B, Tmax) only for the kernel, with a causal + length mask.
Decode has one token per running slot; attention reads each slot's cache up to its own length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.kv_cache import KVCache

PACKED_MIN_WEIGHT = 1 << 16  # smaller matrices (tiny models) lose more to oneDNN's call overhead


def _can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() >= PACKED_MIN_WEIGHT
            and torch.backends.mkldnn.is_available())


class PackedWeight:
    """``y = x W^T + b``, with W also held in oneDNN's blocked layout on CPU float32.

    On the CPUs we run on, oneDNN's packed GEMM is about twice as fast as the default sgemm for
    several rows, and for one row (a GEMV streaming the weight from memory) still about 1.3x; a
    row's result does not depend on how many rows come with it. Elsewhere (CUDA, bf16, small
    matrices) it is ``F.linear``. The dense weight stays the model's parameter.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias
        self.packed = weight.detach().to_mkldnn() if _can_pack(weight) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), self.packed, self.bias).to_dense()


class Linear(nn.Linear):
    """``nn.Linear`` that can switch to ``PackedWeight`` once its weights are final (``pack_``).

    Weights always come from a checkpoint, so construction leaves them uninitialised."""

    _packed: PackedWeight | None = None

    def reset_parameters(self) -> None:
        pass

    def pack_(self) -> None:
        self._packed = PackedWeight(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return self._packed(x)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """``nn.Embedding`` left uninitialised at construction (weights come from a checkpoint)."""

    def reset_parameters(self) -> None:
        pass


def pack_linears_(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, Linear):
            module.pack_()
    return model


@dataclass
class Batch:
    cache: KVCache
    input_ids: torch.Tensor  # (N,) prefill: packed prompt tokens; decode: (B,) last tokens
    positions: torch.Tensor  # (N,) position of each token in its sequence
    first_slot: int  # prefill: the slot of the first new sequence; decode: 0
    size: int  # B
    t_max: int  # prefill: longest prompt; decode: longest cached length after this step
    mask: torch.Tensor | None  # prefill (B, 1, T, T) / decode (B, 1, 1, T) bool, None when not needed
    pad_b: torch.Tensor | None = None  # prefill: (N,) sequence of each packed token
    pad_t: torch.Tensor | None = None  # prefill: (N,) position of each packed token
    last_index: torch.Tensor | None = None  # prefill: (B,) packed index of each last token
    slots: torch.Tensor | None = None  # decode: arange(B)

    @property
    def is_prefill(self) -> bool:
        return self.last_index is not None

    @staticmethod
    def prefill(cache: KVCache, prompts: list[list[int]], device: torch.device, *, causal: bool = True) -> "Batch":
        lens = [len(p) for p in prompts]
        first = cache.add_slots(lens)
        b, t_max = len(prompts), max(lens)
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64)
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
        return Batch(cache, ids.to(device), pad_t.to(device), first, b, t_max, mask,
                     pad_b.to(device), pad_t.to(device), last.to(device))

    @staticmethod
    def decode(cache: KVCache, last_tokens: torch.Tensor) -> "Batch":
        b = cache.size
        t_max = max(cache.lengths) + 1
        cache.reserve(b, t_max)
        positions = cache.lengths_t[:b]
        mask = None
        if min(cache.lengths) + 1 != t_max:
            keys = torch.arange(t_max, device=cache.device)
            mask = (keys[None, :] <= positions[:, None])[:, None, None, :]  # (B, 1, 1, T)
        slots = torch.arange(b, device=cache.device)
        return Batch(cache, last_tokens, positions, 0, b, t_max, mask, slots=slots)


def to_padded(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(N, heads, D) packed -> (B, heads, T, D)."""
    if batch.size == 1:
        return x.transpose(0, 1).unsqueeze(0)
    out = x.new_zeros(batch.size, batch.t_max, x.shape[1], x.shape[2])
    out[batch.pad_b, batch.pad_t] = x
    return out.transpose(1, 2)


def to_packed(y: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B, heads, T, D) -> (N, heads, D)."""
    if batch.size == 1:
        return y[0].transpose(0, 1)
    return y.transpose(1, 2)[batch.pad_b, batch.pad_t]


def attend_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: Batch, *,
                   causal: bool, scale: float | None = None) -> torch.Tensor:
    """q (N, H, D), k/v (N, Hkv, D) -> (N, H, D); writes k/v into the new slots of the cache."""
    qp, kp, vp = to_padded(q, batch), to_padded(k, batch), to_padded(v, batch)  # (B, h, T, D)
    s0 = batch.first_slot
    batch.cache.kv[layer, 0, s0:s0 + batch.size, :, : batch.t_max] = kp
    batch.cache.kv[layer, 1, s0:s0 + batch.size, :, : batch.t_max] = vp
    y = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=batch.mask,
                                       is_causal=causal and batch.mask is None,
                                       enable_gqa=q.shape[1] != k.shape[1], scale=scale)
    return to_packed(y, batch)


def attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: Batch, *,
                  scale: float | None = None) -> torch.Tensor:
    """q (B, H, D), k/v (B, Hkv, D) -> (B, H, D); appends k/v at each slot's own position."""
    b, h, d = q.shape
    hkv = k.shape[1]
    cache = batch.cache.kv
    cache[layer, 0][batch.slots, :, batch.positions] = k
    cache[layer, 1][batch.slots, :, batch.positions] = v
    keys = cache[layer, 0, :b, :, : batch.t_max]  # (B, Hkv, T, D)
    values = cache[layer, 1, :b, :, : batch.t_max]
    # query heads sharing one kv head become that head's query rows: no copy of the cache for GQA.
    # One query row per head is too small for SDPA's kernels to pay off; two matmuls are faster.
    qg = q.view(b, hkv, h // hkv, d)  # (B, Hkv, G, D)
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * (d ** -0.5 if scale is None else scale)  # (B, Hkv, G, T)
    if batch.mask is not None:
        scores = scores.masked_fill(~batch.mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(b, h, d)  # (B, Hkv, G, D) -> (B, H, D)
