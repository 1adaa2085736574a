"""T5 encoder-decoder: relative position buckets, RMS-style LayerNorm, unscaled attention,
cross-attention over the encoder output.

Parameter names follow Hugging Face's ``T5ForConditionalGeneration``. Two caches per running batch:
``self_cache`` (decoder self-attention, grows by one position per step) and ``cross_cache``
(cross-attention K/V computed once from the encoder output at prefill; its lengths are the prompt
lengths). Both are ``engine.kv_cache.KVCache`` with ``(L, 2, Bcap, H, T, D)`` tensors.

Shapes: N packed prompt tokens, B sequences, S encoder length, T decoder length, C d_model,
H heads, D d_kv, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.kv_cache import KVCache
from engine.models.common import Batch, Embedding, Linear, to_packed, to_padded


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
    decoder_start_token_id: int = 0
    eos_token_id: int = 1
    max_positions: int = 512

    @classmethod
    def from_hf_config(cls, c: dict[str, Any]) -> "ModelArgs":
        proj = c.get("feed_forward_proj", "relu")
        gated = proj.startswith("gated-")
        act = proj.removeprefix("gated-")
        if act not in ("relu", "gelu", "gelu_new"):
            raise ValueError(f"unsupported T5 feed_forward_proj {proj!r}")
        return cls(c["vocab_size"], c["d_model"], c["d_kv"], c["d_ff"], c["num_layers"],
                   c.get("num_decoder_layers") or c["num_layers"], c["num_heads"],
                   c.get("relative_attention_num_buckets", 32), c.get("relative_attention_max_distance", 128),
                   c.get("layer_norm_epsilon", 1e-6), gated, act, c.get("tie_word_embeddings", True),
                   c.get("decoder_start_token_id", 0) or 0, c.get("eos_token_id", 1),
                   c.get("n_positions", 512))


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
    log_part = exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                        * (num_buckets - exact)).long()
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
        self.act = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}[a.activation]

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
        parts = [_SelfAttentionLayer(a, relative_bias=first)]
        if decoder:
            parts.append(_CrossAttentionLayer(a))
        parts.append(_FeedForwardLayer(a))
        self.layer = nn.ModuleList(parts)


class Stack(nn.Module):
    def __init__(self, a: ModelArgs, *, decoder: bool) -> None:
        super().__init__()
        n = a.num_decoder_layers if decoder else a.num_layers
        self.block = nn.ModuleList(Block(a, decoder=decoder, first=i == 0) for i in range(n))
        self.final_layer_norm = LayerNorm(a.d_model, a.layer_norm_epsilon)

    def position_bias(self, rel: torch.Tensor, a: ModelArgs, *, bidirectional: bool) -> torch.Tensor:
        """rel (..., Q, K) relative positions -> (..., H, Q, K) additive bias."""
        buckets = relative_bucket(rel, bidirectional=bidirectional, num_buckets=a.relative_attention_num_buckets,
                                  max_distance=a.relative_attention_max_distance)
        bias = self.block[0].layer[0].SelfAttention.relative_attention_bias(buckets)  # (..., Q, K, H)
        return bias.movedim(-1, -3)


class T5(nn.Module):
    kind = "t5"

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
        a, stack = self.args, self.encoder
        x = self.shared(batch.input_ids)  # (N, C)
        s = batch.t_max
        rel = torch.arange(s, device=x.device)[None, :] - torch.arange(s, device=x.device)[:, None]  # (S, S)
        bias = stack.position_bias(rel, a, bidirectional=True)[None]  # (1, H, S, S)
        if batch.mask is not None:  # (B, 1, 1, S) valid keys
            bias = bias.masked_fill(~batch.mask, float("-inf"))
        bias = bias.to(x.dtype)
        for block in stack.block:
            sa, ff = block.layer[0], block.layer[1]
            h = sa.layer_norm(x)
            att = sa.SelfAttention
            q, k, v = (to_padded(att.heads(p, h), batch) for p in (att.q, att.k, att.v))  # (B, H, S, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
            x = x + att.o(to_packed(y, batch).reshape(x.shape[0], -1))
            x = x + ff.DenseReluDense(ff.layer_norm(x))
        enc = stack.final_layer_norm(x)  # (N, C)
        s0, cache = batch.first_slot, batch.cache
        for i, block in enumerate(self.decoder.block):
            att = block.layer[1].EncDecAttention
            cache.kv[i, 0, s0:s0 + batch.size, :, :s] = to_padded(att.heads(att.k, enc), batch)
            cache.kv[i, 1, s0:s0 + batch.size, :, :s] = to_padded(att.heads(att.v, enc), batch)

    # ---- decoder -------------------------------------------------------------------------------

    def decode(self, tokens: torch.Tensor, self_cache: KVCache, cross_cache: KVCache, start: int) -> torch.Tensor:
        """One decoder step for slots ``start..``: tokens (B,) -> logits (B, V); appends to self_cache."""
        a, stack = self.args, self.decoder
        b = tokens.shape[0]
        slots = torch.arange(start, start + b, device=tokens.device)
        pos = self_cache.lengths_t[start:start + b]  # (B,) position of this token
        t = max(self_cache.lengths[start:]) + 1
        keys = torch.arange(t, device=tokens.device)
        self_bias = stack.position_bias((keys[None, :] - pos[:, None])[:, None, :], a, bidirectional=False)
        self_bias = self_bias.masked_fill((keys[None, :] > pos[:, None])[:, None, None, :], float("-inf"))  # (B,H,1,T)
        s = max(cross_cache.lengths[start:])
        enc_len = cross_cache.lengths_t[start:start + b]
        cross_mask = (torch.arange(s, device=tokens.device)[None, :] < enc_len[:, None])[:, None, None, :]  # (B,1,1,S)
        self_bias = self_bias.to(self_cache.dtype)
        x = self.shared(tokens)  # (B, C)
        for i, block in enumerate(stack.block):
            sa, ca, ff = block.layer
            att = sa.SelfAttention
            h = sa.layer_norm(x)
            q, k, v = (att.heads(p, h) for p in (att.q, att.k, att.v))  # (B, H, D)
            self_cache.kv[i, 0][slots, :, pos] = k
            self_cache.kv[i, 1][slots, :, pos] = v
            y = F.scaled_dot_product_attention(
                q[:, :, None], self_cache.kv[i, 0, start:start + b, :, :t], self_cache.kv[i, 1, start:start + b, :, :t],
                attn_mask=self_bias, scale=1.0)  # (B, H, 1, D)
            x = x + att.o(y.reshape(b, -1))
            cross = ca.EncDecAttention
            q = cross.heads(cross.q, ca.layer_norm(x))[:, :, None]  # (B, H, 1, D)
            y = F.scaled_dot_product_attention(
                q, cross_cache.kv[i, 0, start:start + b, :, :s], cross_cache.kv[i, 1, start:start + b, :, :s],
                attn_mask=cross_mask, scale=1.0)
            x = x + cross.o(y.reshape(b, -1))
            x = x + ff.DenseReluDense(ff.layer_norm(x))
        x = stack.final_layer_norm(x)
        if a.tie_word_embeddings:
            x = x * a.d_model ** -0.5
        return self.lm_head(x).float()  # (B, V)
