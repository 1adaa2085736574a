"""T5 encoder-decoder: relative position buckets, RMS-style LayerNorm, unscaled attention,
cross-attention over the encoder output.

Parameter names follow Hugging Face's ``T5ForConditionalGeneration``. Two caches per running batch:
``self_cache`` (decoder self-attention, grows by one position per step) and ``cross_cache``
(cross-attention K/V computed once from the encoder output at prefill; its lengths are the prompt
lengths). Both are ``engine.kv_cache.KVCache`` with ``(L, 2, Bcap, H, T, D)`` tensors.

A decoder pass is one ``Batch`` on the self-attention cache, like a decoder-only step: decode rows
of running slots, then new sequences teacher-forced through their decoder inputs (the start token,
then the tokens a resumed request already produced).

Shapes: N packed tokens (encoder: prompts; decoder: a step's rows), B sequences, S encoder length,
T decoder length, C d_model, H heads, D d_kv, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from engine.kv_cache import KVCache
from engine.models.common import Batch, Embedding, Linear, Prompts, attend, to_packed, to_padded


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    gated: bool = False  # T5 v1.1 "gated-gelu"
    activation: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True  # multiply by d_model**-0.5 before the LM head (original T5)
    decoder_start_token_id: int = 0
    eos_token_id: int = 1
    max_positions: int = 512

    @classmethod
    def from_hf_config(cls, c: dict[str, Any]) -> ModelArgs:
        proj = c.get("feed_forward_proj", "relu")
        gated = proj.startswith("gated-")
        act = c.get("dense_act_fn") or proj.removeprefix("gated-")
        if proj == "gated-gelu":
            act = "gelu_new"  # T5 v1.1 checkpoints mean the tanh approximation here
        if act not in ("relu", "gelu", "gelu_new"):
            raise ValueError(f"unsupported T5 feed_forward_proj {proj!r}")
        return cls(
            c["vocab_size"],
            c["d_model"],
            c["d_kv"],
            c["d_ff"],
            c["num_layers"],
            c.get("num_decoder_layers") or c["num_layers"],
            c["num_heads"],
            c.get("relative_attention_num_buckets", 32),
            c.get("relative_attention_max_distance", 128),
            c.get("layer_norm_epsilon", 1e-6),
            gated,
            act,
            c.get("tie_word_embeddings", True),
            # older configs imply the rescale by tying; newer ones say so explicitly
            c.get("scale_decoder_outputs", c.get("tie_word_embeddings", True)),
            c.get("decoder_start_token_id", 0) or 0,
            c.get("eos_token_id", 1),
            c.get("n_positions", 512),
        )


def relative_bucket(rel: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key - query): exact for small distances, log-spaced
    up to ``max_distance``; bidirectional buckets use half the range for keys after the query."""
    bucket = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rel > 0).long() * num_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    exact = num_buckets // 2
    log_part = (
        exact
        + (torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (num_buckets - exact)).long()
    )
    log_part = log_part.clamp(max=num_buckets - 1)
    return bucket + torch.where(dist < exact, dist, log_part)


class LayerNorm(nn.Module):
    """T5's norm: scale by the root mean square, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, *, relative_bias: bool) -> None:
        super().__init__()
        inner = a.num_heads * a.d_kv
        self.n_head, self.head_dim = a.num_heads, a.d_kv
        self.q = Linear(a.d_model, inner, bias=False)
        self.k = Linear(a.d_model, inner, bias=False)
        self.v = Linear(a.d_model, inner, bias=False)
        self.o = Linear(inner, a.d_model, bias=False)
        if relative_bias:
            self.relative_attention_bias = Embedding(a.relative_attention_num_buckets, a.num_heads)

    def heads(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return proj(x).view(x.shape[0], self.n_head, self.head_dim)  # (N, H, D)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        if a.gated:
            self.wi_0 = Linear(a.d_model, a.d_ff, bias=False)
            self.wi_1 = Linear(a.d_model, a.d_ff, bias=False)
        else:
            self.wi = Linear(a.d_model, a.d_ff, bias=False)
        self.wo = Linear(a.d_ff, a.d_model, bias=False)
        self.gated = a.gated
        self.act = ACTIVATIONS[a.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class _SelfAttentionLayer(nn.Module):
    def __init__(self, a: ModelArgs, relative_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = Attention(a, relative_bias=relative_bias)
        self.layer_norm = LayerNorm(a.d_model, a.layer_norm_epsilon)


class _CrossAttentionLayer(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.EncDecAttention = Attention(a, relative_bias=False)
        self.layer_norm = LayerNorm(a.d_model, a.layer_norm_epsilon)


class _FeedForwardLayer(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.DenseReluDense = FeedForward(a)
        self.layer_norm = LayerNorm(a.d_model, a.layer_norm_epsilon)


class Block(nn.Module):
    def __init__(self, a: ModelArgs, *, decoder: bool, first: bool) -> None:
        super().__init__()
        parts: list[nn.Module] = [_SelfAttentionLayer(a, relative_bias=first)]
        if decoder:
            parts.append(_CrossAttentionLayer(a))
        parts.append(_FeedForwardLayer(a))
        self.layer = nn.ModuleList(parts)

    # ``layer`` by role, typed (a ModuleList's items are plain modules to a type checker)

    @property
    def self_attention(self) -> _SelfAttentionLayer:
        return cast(_SelfAttentionLayer, self.layer[0])

    @property
    def cross_attention(self) -> _CrossAttentionLayer:
        """A decoder block's (an encoder block has none)."""
        return cast(_CrossAttentionLayer, self.layer[1])

    @property
    def feed_forward(self) -> _FeedForwardLayer:
        return cast(_FeedForwardLayer, self.layer[-1])


class Stack(nn.Module):
    def __init__(self, a: ModelArgs, *, decoder: bool) -> None:
        super().__init__()
        n = a.num_decoder_layers if decoder else a.num_layers
        self.block = nn.ModuleList(Block(a, decoder=decoder, first=i == 0) for i in range(n))
        self.final_layer_norm = LayerNorm(a.d_model, a.layer_norm_epsilon)

    def at(self, i: int) -> Block:
        """Block ``i``, typed (a pipeline stage holds ``nn.Identity`` where it dropped one)."""
        return cast(Block, self.block[i])

    def position_bias(self, rel: torch.Tensor, a: ModelArgs, *, bidirectional: bool) -> torch.Tensor:
        """rel (..., Q, K) relative positions -> (..., H, Q, K) additive bias."""
        buckets = relative_bucket(
            rel,
            bidirectional=bidirectional,
            num_buckets=a.relative_attention_num_buckets,
            max_distance=a.relative_attention_max_distance,
        )
        # a pipeline stage without layer 0 keeps its bias table aside (``engine.parallel``)
        table = self.__dict__.get("kept_bias") or self.at(0).self_attention.SelfAttention.relative_attention_bias
        bias = table(buckets)  # (..., Q, K, H)
        return bias.movedim(-1, -3)


class T5(nn.Module):
    kind: Literal["t5"] = "t5"
    # set after construction, where they apply (absent until then: read them with getattr)
    quant: str  # engine.quant.quantize_: the mode the projections run in
    local_kv_heads: int  # engine.parallel.shard.shard_tp: the kv heads of this TP rank's cache

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.shared = Embedding(args.vocab_size, args.d_model)
        self.encoder = Stack(args, decoder=False)
        self.decoder = Stack(args, decoder=True)
        self.lm_head = Linear(args.d_model, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        self.tied_weights = {"lm_head.weight": "shared.weight"} if args.tie_word_embeddings else {}

    def max_positions(self) -> int:
        return self.args.max_positions

    def cache_geometry(self) -> tuple[int, int, int]:
        return self.args.num_decoder_layers, self.args.num_heads, self.args.d_kv

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = dict(state)
        for stack in ("encoder", "decoder"):  # HF saves the stacks' own (tied) copies of shared
            state.pop(f"{stack}.embed_tokens.weight", None)
        return state

    # ---- encoder -------------------------------------------------------------------------------

    def encode(self, batch: Batch) -> None:
        """Run the encoder over the packed prompts and fill the cross-attention cache's new slots."""
        x = self.encode_layers(self.shared(batch.input_ids), batch, range(len(self.encoder.block)))
        self.write_cross(self.encoder.final_layer_norm(x), batch, range(len(self.decoder.block)))

    # A pipeline stage runs some of the pieces below (``engine.parallel``): encoder layers, the
    # cross-attention K/V of its decoder layers (from the whole encoder's output), decoder layers.

    def encode_layers(self, x: torch.Tensor, batch: Batch, layers: range) -> torch.Tensor:
        """Encoder layers ``layers`` over the packed prompt rows x (N, C)."""
        a, stack, part = self.args, self.encoder, batch.prompts
        assert part is not None  # the encoder runs over new sequences only
        s = part.t_max
        rel = torch.arange(s, device=x.device)[None, :] - torch.arange(s, device=x.device)[:, None]  # (S, S)
        bias = stack.position_bias(rel, a, bidirectional=True)[None]  # (1, H, S, S)
        if part.mask is not None:  # (B, 1, 1, S) valid keys
            bias = bias.masked_fill(~part.mask, float("-inf"))
        bias = bias.to(x.dtype)
        for i in layers:
            block = stack.at(i)
            sa, ff = block.self_attention, block.feed_forward
            h = sa.layer_norm(x)
            att = sa.SelfAttention
            q, k, v = (to_padded(att.heads(p, h), part) for p in (att.q, att.k, att.v))  # (B, H, S, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
            x = x + att.o(to_packed(y, part).reshape(x.shape[0], -1))
            x = x + ff.DenseReluDense(ff.layer_norm(x))
        return x

    def write_cross(self, enc: torch.Tensor, batch: Batch, layers: range) -> None:
        """Cross-attention K/V of decoder layers ``layers`` from the encoder output enc (N, C), into
        the new slots of ``batch.cache`` (which holds those layers from index 0)."""
        part = batch.prompts
        assert part is not None  # the encoder's output is the new sequences'
        s0, s, cache = part.first_slot, part.t_max, batch.cache
        for local, i in enumerate(layers):
            att = self.decoder.at(i).cross_attention.EncDecAttention
            cache.kv[local, 0, s0 : s0 + part.size, :, :s] = to_padded(att.heads(att.k, enc), part)
            cache.kv[local, 1, s0 : s0 + part.size, :, :s] = to_padded(att.heads(att.v, enc), part)

    # ---- decoder -------------------------------------------------------------------------------

    def decode(self, batch: Batch, cross: KVCache) -> torch.Tensor:
        """One decoder pass over ``batch`` (built on the self-attention cache): decode rows advance
        running slots by one token; new sequences are teacher-forced through their decoder inputs
        (start token, then any resumed tokens). Cross-attention reads ``cross`` for the same slots.
        Returns the logits of ``batch.logit_rows`` (B, V)."""
        x = self.decode_layers(self.shared(batch.input_ids), batch, cross, range(len(self.decoder.block)))
        return self.decode_head(x, batch)

    def decode_layers(self, x: torch.Tensor, batch: Batch, cross: KVCache, layers: range) -> torch.Tensor:
        """Decoder layers ``layers`` over x (N, C); both caches hold those layers from index 0."""
        n = x.shape[0]
        decode_bias, prompt_bias = self._self_biases(batch)
        cross_parts = _cross_parts(batch, cross)
        for local, i in enumerate(layers):
            block = self.decoder.at(i)
            sa, ca, ff = block.self_attention, block.cross_attention, block.feed_forward
            att = sa.SelfAttention
            h = sa.layer_norm(x)
            q, k, v = (att.heads(p, h) for p in (att.q, att.k, att.v))  # (N, H, D)
            y = attend(q, k, v, local, batch, scale=1.0, decode_bias=decode_bias, prompt_bias=prompt_bias)
            x = x + att.o(y.reshape(n, -1))
            xa = ca.EncDecAttention
            q = xa.heads(xa.q, ca.layer_norm(x))  # (N, H, D)
            x = x + xa.o(_attend_cross(q, cross.kv[local], cross_parts).reshape(n, -1))
            x = x + ff.DenseReluDense(ff.layer_norm(x))
        return x

    def decode_head(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        x = x if batch.logit_rows is None else x[batch.logit_rows]  # (B, C)
        x = self.decoder.final_layer_norm(x)
        if self.args.scale_decoder_outputs:
            x = x * self.args.d_model**-0.5
        return self.lm_head(x).float()  # (B, V)

    def _self_biases(self, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Relative position biases with the masks folded in (-inf: hidden key): decode rows
        (B, H, 1, T) over their cached positions, new sequences (B or 1, H, T, T) causal."""
        a, stack, dtype = self.args, self.decoder, batch.cache.dtype
        decode_bias = prompt_bias = None
        if batch.decodes is not None:
            part = batch.decodes
            keys = torch.arange(part.t_max, device=part.positions.device)
            rel = (keys[None, :] - part.positions[:, None])[:, None, :]  # (B, 1, T)
            decode_bias = stack.position_bias(rel, a, bidirectional=False)
            if part.mask is not None:
                decode_bias = decode_bias.masked_fill(~part.mask, float("-inf"))
            decode_bias = decode_bias.to(dtype)
        if batch.prompts is not None:
            new = batch.prompts
            t = torch.arange(new.t_max, device=batch.input_ids.device)
            prompt_bias = stack.position_bias(t[None, :] - t[:, None], a, bidirectional=False)[None]
            mask = new.mask if new.mask is not None else (t[None, :] <= t[:, None])  # causal (+ lengths)
            prompt_bias = prompt_bias.masked_fill(~mask, float("-inf")).to(dtype)
        return decode_bias, prompt_bias


@dataclass
class _CrossPart:
    """Rows ``rows`` of a decoder pass read cross slots ``first..first+size`` up to ``s`` positions."""

    rows: slice
    first: int
    size: int
    s: int
    mask: torch.Tensor  # (size, 1, 1, S) valid encoder positions
    prompts: Prompts | None  # new sequences: rows are packed tokens; None: one row per slot


def _cross_parts(batch: Batch, cross: KVCache) -> list[_CrossPart]:
    """Where each part of a decoder pass reads the cross cache: decode rows (padding rows over the
    longest encoder output), then the new sequences."""
    parts = []
    dev = batch.input_ids.device
    if batch.decodes is not None:
        d = batch.decodes
        live = cross.lengths[: d.live] or cross.lengths or [1]  # padding rows: the longest prompt
        s = max(live)
        enc_len = cross.lengths_t[: d.live]
        if d.size > d.live:
            enc_len = torch.cat([enc_len, torch.full((d.size - d.live,), s, device=dev)])
        mask = (torch.arange(s, device=dev)[None, :] < enc_len[:, None])[:, None, None, :]
        parts.append(_CrossPart(slice(0, d.size), 0, d.size, s, mask, None))
    if batch.prompts is not None:
        p = batch.prompts
        lengths = cross.lengths[p.first_slot : p.first_slot + p.size]
        s = max(lengths)
        mask = (torch.arange(s)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :].to(dev)
        start = batch.decodes.size if batch.decodes is not None else 0
        parts.append(_CrossPart(slice(start, None), p.first_slot, p.size, s, mask, p))
    return parts


def _attend_cross(q: torch.Tensor, kv: torch.Tensor, parts: list[_CrossPart]) -> torch.Tensor:
    """q (N, H, D) over one layer's cross cache kv (2, Bcap, H, S, D) -> (N, H, D)."""
    out = []
    for part in parts:
        keys = kv[0, part.first : part.first + part.size, :, : part.s]  # (B, H, S, D)
        values = kv[1, part.first : part.first + part.size, :, : part.s]
        if part.prompts is None:  # one query per slot
            y = F.scaled_dot_product_attention(q[part.rows, :, None], keys, values, attn_mask=part.mask, scale=1.0)
            out.append(y[:, :, 0])  # (B, H, D)
        else:
            qp = to_padded(q[part.rows], part.prompts)  # (B, H, T, D)
            y = F.scaled_dot_product_attention(qp, keys, values, attn_mask=part.mask, scale=1.0)
            out.append(to_packed(y, part.prompts))
    return out[0] if len(out) == 1 else torch.cat(out)
