"""Llama-family decoder (Llama 2/3, SmolLM2): RoPE, RMSNorm, SwiGLU, grouped-query attention.

Parameter names follow the Hugging Face layout (``model.layers.0.self_attn.q_proj.weight``...), so a
safetensors state dict loads as is; loading itself lives in ``engine.loading``.

Shapes: N rows of a step (decode rows, then packed prompt tokens), B sequences, C hidden, H query
heads, Hkv key/value heads, D head dim, T cached positions, V vocabulary. The KV cache
(``engine.kv_cache.KVCache``) holds ``(L, 2, Bcap, Hkv, Tcap, D)``; this module reads and writes it
in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.common import Batch, Embedding, Linear, PackedWeight, attend, pack_linears_


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise ValueError(f"unsupported RoPE type {rope_type!r} (only 'default')")
        eos = cfg.get("eos_token_id")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C)
        if x.dtype == torch.float32:  # one fused call; same arithmetic as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(args: ModelArgs, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of shape (length, D) in the rotate-half layout (frequencies repeated twice).

    Rotate-half is ``x * cos + cat(-x2, x1) * sin``; with the sign folded into the table's first half
    it becomes ``x * cos + roll(x, D/2) * signed_sin``.
    """
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
    sign = torch.cat([-torch.ones(d // 2), torch.ones(d // 2)])
    return emb.cos().to(device), (emb.sin() * sign).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: (N, heads, D); cos/signed_sin: (N, 1, D) float32."""
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * signed_sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        c, h, hkv, d = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.n_head, self.n_kv, self.head_dim = h, hkv, d
        self.q_proj = Linear(c, h * d, bias=False)
        self.k_proj = Linear(c, hkv * d, bias=False)
        self.v_proj = Linear(c, hkv * d, bias=False)
        self.o_proj = Linear(h * d, c, bias=False)
        self._qkv: PackedWeight | None = None

    def fuse_(self, pack: bool = True) -> None:
        """One (H + 2Hkv)D x C weight for q, k, v; the three projections become views of it."""
        fused = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        _view_params(fused, [self.q_proj, self.k_proj, self.v_proj])
        self._qkv = PackedWeight(fused, pack=pack)

    def forward(self, x: torch.Tensor, layer: int, batch: Batch, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]  # x: (N, C) the step's rows (``Batch``: decode rows, then packed prompt tokens)
        h, hkv = self.n_head, self.n_kv
        if self._qkv is not None:
            qkv = self._qkv(x).view(n, h + 2 * hkv, self.head_dim)  # (N, H + 2Hkv, D)
            qk = apply_rope(qkv[:, : h + hkv], cos, sin)  # q and k rotated together
            q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + hkv :]  # (N, H, D), (N, Hkv, D), (N, Hkv, D)
        else:
            q = apply_rope(self.q_proj(x).view(n, h, self.head_dim), cos, sin)  # (N, H, D)
            k = apply_rope(self.k_proj(x).view(n, hkv, self.head_dim), cos, sin)  # (N, Hkv, D)
            v = self.v_proj(x).view(n, hkv, self.head_dim)  # (N, Hkv, D)
        y = attend(q, k, v, layer, batch)  # decode rows over their caches, prompt rows causally
        return self.o_proj(y.reshape(n, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=False)
        self._gate_up: PackedWeight | None = None

    def fuse_(self, pack: bool = True) -> None:
        fused = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        _view_params(fused, [self.gate_proj, self.up_proj])
        self._gate_up = PackedWeight(fused, pack=pack)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up is not None:
            gate, up = self._gate_up(x).chunk(2, dim=-1)  # (N, F) each
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _view_params(fused: torch.Tensor, linears: list[Linear]) -> None:
    """Make each linear's weight a row slice of ``fused`` (shared storage, names unchanged)."""
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, layer: int, batch: Batch, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), layer, batch, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def at(self, i: int) -> Block:
        """Layer ``i``, typed (a pipeline stage holds ``nn.Identity`` where it dropped one)."""
        return cast(Block, self.layers[i])


class Llama(nn.Module):
    """Decoder-only Llama. ``forward(batch)`` returns the logits of ``batch.logit_rows`` (B, V): each
    decode row, then each new sequence's last token."""

    kind: Literal["llama"] = "llama"
    # set after construction, where they apply (absent until then: read them with getattr)
    quant: str  # engine.quant.quantize_: the mode the projections run in
    compute_dtype: torch.dtype  # engine.native: the dtype computed in, its tables stored smaller
    local_kv_heads: int  # engine.parallel.shard.shard_tp: the kv heads of this TP rank's cache

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaBody(args)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def tied_weights(self) -> dict[str, str]:
        """Parameters that share storage with another: name -> source name."""
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.args.tie_word_embeddings else {}

    def max_positions(self) -> int:
        return self.args.max_position_embeddings

    def fuse_(self, pack: bool = True) -> Llama:
        """After loading: fuse q/k/v and gate/up into single matmuls (fewer, larger GEMMs), and pack
        every projection for the CPU where that helps (``PackedWeight``; ``pack`` False: none is,
        as when quantized copies will run instead)."""
        for block in self.model.layers:
            if not isinstance(block, Block):  # a pipeline stage's dropped layer
                continue
            block.self_attn.fuse_(pack)
            block.mlp.fuse_(pack)
        return pack_linears_(self, pack)

    def cache_geometry(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) of the KV cache this model writes."""
        a = self.args
        return a.num_hidden_layers, a.num_key_value_heads, a.head_dim

    def _rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].device != positions.device:
            self._rope = rope_tables(self.args, self.args.max_position_embeddings, positions.device)
        cos, sin = self._rope
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (N, 1, D)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.run_layers(self.embed(batch), batch, range(len(self.model.layers))), batch)

    # A pipeline stage runs some of these three (``engine.parallel``): the first stage embeds, every
    # stage runs its layers, the last one applies the head.

    def embed(self, batch: Batch) -> torch.Tensor:
        return self.model.embed_tokens(batch.input_ids)  # (N, C)

    def run_layers(self, x: torch.Tensor, batch: Batch, layers: range) -> torch.Tensor:
        """Layers ``layers`` (model numbering) over x (N, C); the cache holds them from index 0."""
        cos, sin = self._rope_at(batch.positions)
        for local, i in enumerate(layers):
            x = self.model.layers[i](x, local, batch, cos, sin)
        return x

    def head(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        x = x if batch.logit_rows is None else x[batch.logit_rows]  # (B, C): decode rows, new last tokens
        return self.lm_head(self.model.norm(x)).float()  # (B, V)
