"""A GGUF in its own precision: projections stored as Q4_0/Q4_1 run as int4 on the file's codes, and
no dense copy of them is ever made.

``load_native(*read_native(path)[:3], dtype)`` builds the Llama on the ``meta`` device from one read of
the file (``engine.gguf_loader.read_gguf_native``: the projections' Q4_0/Q4_1 tensors come as ``Int4Grid``s,
never dequantized) and gives each projection its packed int4 weight straight from the grid: the
fused q/k/v and gate/up from their parts' grids laid one after the other. A projection stored in
another type (Q8_0, a K-quant, F16, F32) is dequantized alone and quantized (int4, or int8 where
the int4 kernel cannot take its shape), then its dense copy is dropped. What else the model holds:

- the norms in ``dtype``;
- the embedding table as float16, dequantized a block of rows at a time (its rows are cast to
  ``dtype`` when looked up): SmolLM2's is Q8_0, which float16 holds to about 1e-4 relative;
- the LM head as ``engine.quant.float32_logits_`` makes it in every quantized mode (float16 weights,
  float32 logits), packed from the float16 table (the embedding's when tied) a block at a time.

The file is mapped, not read: each tensor's pages are dropped from the process once converted
(``GGUFFile.release``), and the heap's freed memory goes back to the system after each layer
(``give_back_freed``), so a load peaks at about the model it makes plus one layer.

The projections' parameters stay on the ``meta`` device: they have their shapes and names, but no
data, so ``state_dict()`` holds meta tensors for them (``model.compute_dtype`` names the dtype the
model computes in). What reads dense weights (the oracle tests, the engine benchmark's
``transformers`` reference) reads a float32 load of the same file (``load_engine(..., quant="none")``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.gguf_loader import TABLES, read_gguf_native
from engine.quant import Int4Grid, Int4Weight, can_int4, float32_logits_, quantized

if TYPE_CHECKING:
    from engine.models.llama import Llama

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_projection(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in PROJECTIONS


def read_native(path: Path):
    """(config, dense state, projections' int4 grids, tokenizer) of a Llama GGUF, read once."""
    return read_gguf_native(path, is_projection)


def load_native(
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    grids: Mapping[str, Int4Grid],
    dtype: torch.dtype,
    path: Path | str = "GGUF file",
) -> Llama:
    """The Llama of ``read_native``'s parts with int4 projections and no dense copy of them (CPU)."""
    from engine.loading import build_model, set_param

    with torch.device("meta"):
        model = build_model("llama", config)
    dense = {name: tensor for name, tensor in state.items() if not is_projection(name)}
    own = {name: tensor if name in TABLES else tensor.to(dtype) for name, tensor in dense.items()}
    missing = sorted(set(model.state_dict()) - set(state) - set(grids) - set(model.tied_weights))
    if missing:
        raise ValueError(f"{path}: weights missing from the file: {', '.join(missing[:5])}")
    model.load_state_dict(own, assign=True, strict=False)
    for name, source in model.tied_weights.items():
        set_param(model, name, model.get_parameter(source))
    model = model.eval().requires_grad_(False)
    for i in range(len(model.model.layers)):
        block = model.model.at(i)
        attn, mlp = block.self_attn, block.mlp
        prefix_a, prefix_m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        attn._qkv = _projection([f"{prefix_a}.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")], grids, state)
        mlp._gate_up = _projection([f"{prefix_m}.{p}.weight" for p in ("gate_proj", "up_proj")], grids, state)
        attn.o_proj._packed = _projection([f"{prefix_a}.o_proj.weight"], grids, state)
        mlp.down_proj._packed = _projection([f"{prefix_m}.down_proj.weight"], grids, state)
        give_back_freed()  # each layer's unpacked codes, before the next layer's
    float32_logits_(model)  # packed from the float16 table, a block of rows at a time
    model.model.embed_tokens.out_dtype = dtype
    if not model.args.tie_word_embeddings:
        model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight, device="meta"), requires_grad=False)
    model.quant = "int4"
    model.compute_dtype = dtype
    return model


def give_back_freed() -> None:
    """Return the heap's free memory to the system (glibc's ``malloc_trim``; elsewhere nothing).
    glibc serves a freed large block's size from its heap afterwards, and keeps what is freed
    there: a load that unpacks a layer at a time would otherwise peak at about 150 MB more."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _projection(names: list[str], grids: Mapping[str, Int4Grid], state: dict[str, torch.Tensor]):
    """The packed weight of the projections ``names`` laid one after the other (a fused one)."""
    if all(name in grids for name in names):
        grid = grids[names[0]] if len(names) == 1 else Int4Grid.cat([grids[name] for name in names])
        if can_int4(grid.codes):
            return Int4Weight.from_grid(grid)
    parts = [grids[name].dequantize() if name in grids else state[name] for name in names]
    return quantized(torch.cat(parts) if len(parts) > 1 else parts[0], None, "int4")
