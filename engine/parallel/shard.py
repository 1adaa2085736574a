"""Cutting a loaded model down to what one rank of a group holds.

Tensor parallelism (Megatron-style): attention heads and the FFN's hidden units are split into
contiguous ranges, one per TP rank. The projections into heads (q/k/v) and into the FFN's hidden
units are split by output rows (column-parallel); the projections back to the model width (o, down)
by input columns (row-parallel), each followed by one all-reduce over the stage's TP ranks, so a
block costs two all-reduces of (rows, C). The KV cache then holds only the rank's kv heads.
Grouped-query attention is split by kv heads with their query heads, so head counts need not divide
evenly (SmolLM2's 3 kv heads over 2 ranks: 2 and 1). Embeddings, norms and the LM head are
replicated.

Pipeline parallelism: a stage keeps only its layers (the others become ``nn.Identity``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from engine.models import gpt, llama, t5
from engine.models.common import Linear
from engine.parallel.shape import split

if TYPE_CHECKING:
    from engine.models import Model

B = TypeVar("B", bound=nn.Module)


class RowParallel(Linear):
    """The row-parallel half of a TP pair: this rank's input columns, summed over the group by one
    all-reduce, then the (whole) bias added once."""

    group: object = None
    after_bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.group is not None:
            dist.all_reduce(y, group=self.group)
        return y if self.after_bias is None else y + self.after_bias


def _rows(linear: Linear, rows: range) -> None:
    linear.weight = nn.Parameter(linear.weight[rows.start : rows.stop].contiguous(), requires_grad=False)
    linear.out_features = len(rows)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias[rows.start : rows.stop].contiguous(), requires_grad=False)


def _columns(linear: Linear, cols: range, group) -> None:
    linear.weight = nn.Parameter(linear.weight[:, cols.start : cols.stop].contiguous(), requires_grad=False)
    linear.in_features = len(cols)
    bias = linear.bias
    # torch types Linear.bias as a Parameter, though a Linear built without a bias holds None
    linear.bias = None  # type: ignore[assignment]
    linear.__class__ = RowParallel
    linear.group = group
    linear.after_bias = None if bias is None else bias.detach()


def _scaled(r: range, k: int) -> range:
    return range(r.start * k, r.stop * k)


@dataclass(frozen=True)
class HeadSplit:
    """This rank's share of one attention: kv heads ``kv``, query heads ``q``."""

    kv: range
    q: range


def head_split(heads: int, kv_heads: int, tp: int, tp_rank: int) -> HeadSplit:
    if kv_heads < tp:
        raise ValueError(f"{kv_heads} key/value heads cannot be split over {tp} tensor-parallel ranks")
    kv = split(kv_heads, tp, tp_rank)
    return HeadSplit(kv, _scaled(kv, heads // kv_heads))


def shard_tp(model: Model, tp: int, tp_rank: int, group) -> None:
    """Keep this TP rank's heads and FFN units of every layer of ``model`` (unfused, just loaded)."""
    if tp == 1:
        return
    if model.kind == "llama":
        _shard_llama(model, tp, tp_rank, group)
    elif model.kind in ("opt", "gpt2"):
        _shard_gpt(model, tp, tp_rank, group)
    elif model.kind == "t5":
        _shard_t5(model, tp, tp_rank, group)
    else:
        raise ValueError(f"tensor parallelism does not support model kind {model.kind!r}")


def _shard_llama(model: llama.Llama, tp: int, tp_rank: int, group) -> None:
    a = model.args
    hs = head_split(a.num_attention_heads, a.num_key_value_heads, tp, tp_rank)
    ffn = split(a.intermediate_size, tp, tp_rank)
    d = a.head_dim
    for block in _kept(model.model.layers, llama.Block):
        att, mlp = block.self_attn, block.mlp
        _rows(att.q_proj, _scaled(hs.q, d))
        _rows(att.k_proj, _scaled(hs.kv, d))
        _rows(att.v_proj, _scaled(hs.kv, d))
        _columns(att.o_proj, _scaled(hs.q, d), group)
        att.n_head, att.n_kv = len(hs.q), len(hs.kv)
        _rows(mlp.gate_proj, ffn)
        _rows(mlp.up_proj, ffn)
        _columns(mlp.down_proj, ffn, group)
    model.local_kv_heads = len(hs.kv)


def _shard_gpt(model: gpt.GPT, tp: int, tp_rank: int, group) -> None:
    a = model.args
    hs = head_split(a.num_attention_heads, a.num_attention_heads, tp, tp_rank)
    ffn = split(a.ffn_dim, tp, tp_rank)
    d = a.head_dim
    for block in _kept(model.model.decoder.layers, gpt.Block):
        att = block.self_attn
        for proj in (att.q_proj, att.k_proj, att.v_proj):
            _rows(proj, _scaled(hs.q, d))
        _columns(att.out_proj, _scaled(hs.q, d), group)
        att.n_head = len(hs.q)
        _rows(block.fc1, ffn)
        _columns(block.fc2, ffn, group)
    model.local_kv_heads = len(hs.kv)


def _shard_t5(model: t5.T5, tp: int, tp_rank: int, group) -> None:
    a = model.args
    hs = head_split(a.num_heads, a.num_heads, tp, tp_rank)
    ffn = split(a.d_ff, tp, tp_rank)
    d = a.d_kv
    for stack in (model.encoder, model.decoder):
        table = stack.__dict__.get("kept_bias")  # a stage without block 0 holds its table aside
        if table is not None:
            table.weight = nn.Parameter(table.weight[:, hs.q.start : hs.q.stop].contiguous(), requires_grad=False)
        for block in _kept(stack.block, t5.Block):
            for part in block.layer:
                att = getattr(part, "SelfAttention", None) or getattr(part, "EncDecAttention", None)
                if att is not None:
                    for proj in (att.q, att.k, att.v):
                        _rows(proj, _scaled(hs.q, d))
                    _columns(att.o, _scaled(hs.q, d), group)
                    att.n_head = len(hs.q)
                    table = getattr(att, "relative_attention_bias", None)
                    if table is not None:  # (buckets, H): this rank's heads
                        table.weight = nn.Parameter(
                            table.weight[:, hs.q.start : hs.q.stop].contiguous(), requires_grad=False
                        )
                ff = getattr(part, "DenseReluDense", None)
                if ff is not None:
                    for name in ("wi", "wi_0", "wi_1"):
                        if hasattr(ff, name):
                            _rows(getattr(ff, name), ffn)
                    _columns(ff.wo, ffn, group)
    model.local_kv_heads = len(hs.kv)


def _kept(layers: nn.ModuleList, block: type[B]) -> list[B]:
    """The layers a stage kept: its ``block``s (those it dropped are ``nn.Identity``)."""
    return [layer for layer in layers if isinstance(layer, block)]


LAYER_NAME = re.compile(r"(?:^|\.)(?:(encoder|decoder)\.block|layers|h)\.(\d+)\.")
T5_BIAS = "layer.0.SelfAttention.relative_attention_bias."


def stage_filter(kept: dict[str, range]) -> Callable[[str], bool]:
    """Whether a checkpoint tensor belongs to a stage that keeps ``kept`` layers of each stack:
    every tensor outside the layers, and the stage's layers' own (T5: and block 0's relative
    position table, which every stage uses). Names as Hugging Face writes them (GPT-2's ``h.N``)."""

    def keep(name: str) -> bool:
        m = LAYER_NAME.search(name)
        if m is None:
            return True
        stack, index = m.group(1) or "layers", int(m.group(2))
        return stack not in kept or index in kept[stack] or (index == 0 and T5_BIAS in name)

    return keep


def stacks(model: Model) -> dict[str, nn.ModuleList]:
    """The layer stacks a pipeline splits: decoder-only models one, T5 its encoder and decoder."""
    if model.kind == "llama":
        return {"layers": model.model.layers}
    if model.kind in ("opt", "gpt2"):
        return {"layers": model.model.decoder.layers}
    if model.kind == "t5":
        return {"encoder": model.encoder.block, "decoder": model.decoder.block}
    raise ValueError(f"pipeline parallelism does not support model kind {model.kind!r}")


def keep_layers(model: Model, kept: dict[str, range], state: dict[str, torch.Tensor] | None = None) -> None:
    """Drop every layer outside ``kept[stack]`` (the stage's own), before or after loading. T5: a
    stack whose block 0 goes keeps its relative position table aside (every stage needs it),
    loaded from ``state`` when the model is not loaded yet."""
    if model.kind == "t5":
        for name, stack in (("encoder", model.encoder), ("decoder", model.decoder)):
            if 0 in kept[name]:
                continue
            table = stack.at(0).self_attention.SelfAttention.relative_attention_bias
            key = f"{name}.block.0.{T5_BIAS}weight"
            if state is not None and key in state:
                table.weight = nn.Parameter(state[key].clone(), requires_grad=False)
            stack.__dict__["kept_bias"] = table
    for name, layers in stacks(model).items():
        for i in range(len(layers)):
            if i not in kept[name]:
                layers[i] = nn.Identity()


def hidden_width(model: Model) -> int:
    return model.args.d_model if model.kind == "t5" else model.args.hidden_size
