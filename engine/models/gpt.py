"""GPT-style decoder (OPT, GPT-2, GPT-3): learned positions, LayerNorm, biases, ReLU/GELU MLP.

Parameter names follow Hugging Face's OPT (``model.decoder.layers.0.self_attn.q_proj.weight``...);
GPT-2 checkpoints are renamed on load (``adapt_state_dict``: fused ``c_attn`` split, Conv1D
weights transposed). OPT looks positions up at ``position + 2`` (its learned table has two extra
leading rows); GPT-2 at ``position``.

Shapes: N rows of a step (decode rows, then packed prompt tokens), B sequences, C hidden, H heads,
D head dim, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.common import Batch, Embedding, Linear, attend, pack_linears_

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class ModelArgs:
    flavour: Literal["opt", "gpt2"]
    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    position_offset: int  # OPT: 2
    activation: str = "relu"
    layer_norm_eps: float = 1e-5
    pre_layer_norm: bool = True  # OPT-350m is post-LN
    final_layer_norm: bool = True
    word_embed_proj_dim: int | None = None  # OPT-350m projects embeddings in and out
    eos_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, flavour: str, c: dict[str, Any]) -> ModelArgs:
        if flavour == "opt":
            if not c.get("enable_bias", True) or not c.get("layer_norm_elementwise_affine", True):
                raise ValueError("OPT without biases or affine layer norms is not supported")
            pre = c.get("do_layer_norm_before", True)
            proj = c.get("word_embed_proj_dim", c["hidden_size"])
            return cls(
                "opt",
                c["vocab_size"],
                c["hidden_size"],
                c["ffn_dim"],
                c["num_hidden_layers"],
                c["num_attention_heads"],
                c["max_position_embeddings"],
                2,
                c.get("activation_function", "relu"),
                1e-5,
                pre,
                pre and not c.get("_remove_final_layer_norm", False),
                proj if proj != c["hidden_size"] else None,
                c.get("eos_token_id"),
            )
        hidden = c["n_embd"]
        return cls(
            "gpt2",
            c["vocab_size"],
            hidden,
            c.get("n_inner") or 4 * hidden,
            c["n_layer"],
            c["n_head"],
            c["n_positions"],
            0,
            c.get("activation_function", "gelu_new"),
            c.get("layer_norm_epsilon", 1e-5),
            True,
            True,
            None,
            c.get("eos_token_id"),
        )


class Attention(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        c = a.hidden_size
        self.n_head, self.head_dim = a.num_attention_heads, a.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(c, c) for _ in range(4))

    def forward(self, x: torch.Tensor, layer: int, batch: Batch) -> torch.Tensor:
        n = x.shape[0]  # x: (N, C)
        q = self.q_proj(x).view(n, self.n_head, self.head_dim)  # (N, H, D)
        k = self.k_proj(x).view(n, self.n_head, self.head_dim)
        v = self.v_proj(x).view(n, self.n_head, self.head_dim)
        y = attend(q, k, v, layer, batch)  # decode rows over their caches, prompt rows causally
        return self.out_proj(y.reshape(n, -1))


class Block(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.pre = a.pre_layer_norm
        self.act = ACTIVATIONS[a.activation]
        self.self_attn = Attention(a)
        self.self_attn_layer_norm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.fc1 = Linear(a.hidden_size, a.ffn_dim)
        self.fc2 = Linear(a.ffn_dim, a.hidden_size)
        self.final_layer_norm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)

    def forward(self, x: torch.Tensor, layer: int, batch: Batch) -> torch.Tensor:
        if self.pre:
            x = x + self.self_attn(self.self_attn_layer_norm(x), layer, batch)
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, layer, batch))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class Decoder(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        width = a.word_embed_proj_dim or a.hidden_size
        self.embed_tokens = Embedding(a.vocab_size, width)
        self.embed_positions = Embedding(a.max_position_embeddings + a.position_offset, a.hidden_size)
        if a.word_embed_proj_dim:
            self.project_in = Linear(width, a.hidden_size, bias=False)
            self.project_out = Linear(a.hidden_size, width, bias=False)
        if a.final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.num_hidden_layers))

    def at(self, i: int) -> Block:
        """Layer ``i``, typed (a pipeline stage holds ``nn.Identity`` where it dropped one)."""
        return cast(Block, self.layers[i])


class _Body(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.decoder = Decoder(a)


class GPT(nn.Module):
    """``forward(batch)`` returns the logits of ``batch.logit_rows`` (B, V): each decode row, then each
    new sequence's last token."""

    # set after construction, where they apply (absent until then: read them with getattr)
    quant: str  # engine.quant.quantize_: the mode the projections run in
    local_kv_heads: int  # engine.parallel.shard.shard_tp: the kv heads of this TP rank's cache

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.kind = args.flavour
        self.model = _Body(args)
        self.lm_head = Linear(args.word_embed_proj_dim or args.hidden_size, args.vocab_size, bias=False)
        self.lm_head.weight = self.model.decoder.embed_tokens.weight
        self.tied_weights = {"lm_head.weight": "model.decoder.embed_tokens.weight"}

    def max_positions(self) -> int:
        return self.args.max_position_embeddings

    def fuse_(self, pack: bool = True) -> GPT:
        """After loading: pack the projections for the CPU where that helps (``pack`` False: none)."""
        return pack_linears_(self, pack)

    def cache_geometry(self) -> tuple[int, int, int]:
        a = self.args
        return a.num_hidden_layers, a.num_attention_heads, a.head_dim

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.run_layers(self.embed(batch), batch, range(len(self.model.decoder.layers))), batch)

    # A pipeline stage runs some of these three (``engine.parallel``).

    def embed(self, batch: Batch) -> torch.Tensor:
        d = self.model.decoder
        x = d.embed_tokens(batch.input_ids)  # (N, C')
        if self.args.word_embed_proj_dim:
            x = d.project_in(x)
        return x + d.embed_positions(batch.positions + self.args.position_offset)  # (N, C)

    def run_layers(self, x: torch.Tensor, batch: Batch, layers: range) -> torch.Tensor:
        """Layers ``layers`` (model numbering) over x (N, C); the cache holds them from index 0."""
        for local, i in enumerate(layers):
            x = self.model.decoder.layers[i](x, local, batch)
        return x

    def head(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        d = self.model.decoder
        x = x if batch.logit_rows is None else x[batch.logit_rows]  # (B, C): decode rows, new last tokens
        if self.args.final_layer_norm:
            x = d.final_layer_norm(x)
        if self.args.word_embed_proj_dim:
            x = d.project_out(x)
        return self.lm_head(x).float()  # (B, V)

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return gpt2_to_opt_names(state) if self.args.flavour == "gpt2" else state


def gpt2_to_opt_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2 checkpoint names and Conv1D (in, out) weights to our (OPT-named, (out, in)) layout."""
    out: dict[str, torch.Tensor] = {}
    top = {"wte": "embed_tokens", "wpe": "embed_positions", "ln_f": "final_layer_norm"}
    inner = {
        "ln_1": "self_attn_layer_norm",
        "ln_2": "final_layer_norm",
        "attn.c_proj": "self_attn.out_proj",
        "mlp.c_fc": "fc1",
        "mlp.c_proj": "fc2",
    }
    for name, t in state.items():
        name = name.removeprefix("transformer.")
        parts = name.split(".")
        if parts[0] in top:
            out[f"model.decoder.{top[parts[0]]}.{parts[-1]}"] = t
        elif parts[0] == "h":
            i, rest, kind = parts[1], ".".join(parts[2:-1]), parts[-1]
            prefix = f"model.decoder.layers.{i}"
            if rest == "attn.c_attn":
                t = t.t() if kind == "weight" else t
                for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                    out[f"{prefix}.self_attn.{proj}.{kind}"] = chunk.contiguous()
            elif rest in inner:
                is_conv = rest.startswith(("attn.", "mlp."))
                out[f"{prefix}.{inner[rest]}.{kind}"] = t.t().contiguous() if is_conv and kind == "weight" else t
    return out


def model_from_hf_config(model_type: str, config: dict[str, Any]) -> GPT:
    return GPT(ModelArgs.from_hf_config(model_type, config))
