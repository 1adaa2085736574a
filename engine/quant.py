"""Weight-only quantization of a loaded model's projections, for CPU decoding.

A decode step reads every weight matrix from memory once, whatever its batch, so with few rows its
time is the weight bytes over the memory bandwidth. ``quantize_(model, mode)`` gives each projection
a smaller copy that the forward pass uses instead of the dense weight:

- ``fp16``: float16 weights, float32 arithmetic, input and output (fbgemm's fp16 GEMM,
  ``quantized::linear_dynamic_fp16``). 2 bytes a weight; SmolLM2's logits stay within a few
  hundredths of float32's.
- ``int8``: one signed byte a weight, one scale per output row (symmetric); ``_weight_int8pack_mm``.
- ``int4``: four bits a weight in groups of ``INT4_GROUP`` input columns, each group with its own
  scale and offset (its smallest and largest weights are levels 0 and 15); the CPU kernel of
  ``_weight_int4pack_mm``. A matrix it cannot take (output rows not a multiple of 16, input columns
  not a multiple of the group) gets int8 instead. SmolLM2's GGUF stores its layers as Q4_1 (blocks
  of 32 columns with a scale and a minimum): the same grid. Given the file's own codes
  (``Int4Grid``, from ``engine.gguf_loader.read_int4_grids``), ``quantize_`` packs those instead of
  quantizing the dequantized weights again, so the weights are the file's up to the rounding of
  their scales and offsets to bfloat16.

The int8 and int4 kernels read and write bfloat16 (their float32 paths are several to tens of times
slower): such a projection rounds its input to bfloat16 and returns its result in the input's
dtype. With a float32 model the norms, RoPE, attention, residual stream and KV cache stay float32.

The LM head is ``fp16`` in every mode and returns float32 logits whatever the model's dtype:
bfloat16 logits (a step of 0.125 at a logit of 20) turn near ties into exact ties or flip them,
which costs more top-1 agreement than the head's weight bytes are worth, and an int8 or int4 head
loses more still. Embedding lookups read one row per token and stay dense (a tied head's table is
the embedding's; the head's quantized copy is separate).

The model's parameters keep the loaded weights (``state_dict()`` is unchanged); the oneDNN-packed
copies (``PackedWeight``) that the quantized ones replace are dropped, so the memory a quantized
model holds is its parameters in ``dtype`` plus ``quantized_bytes(model)``.

Apply it once, after loading (and sharding): ``load_state(...)`` then ``quantize_(model, mode)``.
CPU only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from engine.models import Model

MODES = ("fp16", "int8", "int4")
INT4_GROUP = 32  # input columns per int4 scale/offset (GGUF's Q4_0/Q4_1 block)
_ACT = torch.bfloat16  # what the int8/int4 kernels read and write


def check_mode(mode: str | None) -> str | None:
    """``mode`` if it is a quantization mode, None for None or ``none``; else ValueError."""
    if mode is None or mode == "none":
        return None
    if mode not in MODES:
        raise ValueError(f"unknown quant {mode!r} ({', '.join(MODES)} or none)")
    if mode == "fp16" and not has_fp16_gemm():
        raise ValueError("quant 'fp16' needs torch's fbgemm backend, which this build of torch lacks")
    return mode


def has_fp16_gemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


class Fp16Weight:
    """``y = x W^T + b`` with W stored in float16, computed in float32: reads x as float32 and returns
    ``out_dtype`` (None: x's dtype). A tall W (an LM head) is packed in blocks of ``BLOCK_ROWS``
    output rows, so that packing it never needs a float32 copy of the whole matrix; every output
    is the same as from one block."""

    BLOCK_ROWS = 8192

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
    ) -> None:
        b = None if bias is None else bias.detach().float().contiguous()
        w = weight.detach()
        self.packs = [
            torch.ops.quantized.linear_prepack_fp16(
                w[i : i + self.BLOCK_ROWS].float().contiguous(), None if b is None else b[i : i + self.BLOCK_ROWS]
            )
            for i in range(0, w.shape[0], self.BLOCK_ROWS)
        ]
        self.shape = tuple(weight.shape)
        self.out_dtype = out_dtype

    def nbytes(self) -> int:
        n, k = self.shape
        return 2 * n * k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float().contiguous()
        parts = [torch.ops.quantized.linear_dynamic_fp16(rows, pack) for pack in self.packs]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y.to(self.out_dtype or x.dtype).view(*x.shape[:-1], y.shape[-1])


class Int8Weight:
    """``y = x W^T + b`` with W as int8 rows times one bfloat16 scale per row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp_(min=1e-12).to(_ACT)  # rounded first: q is computed against it
        self.q = torch.round(w / scale.float()[:, None]).clamp_(-128, 127).to(torch.int8).contiguous()  # (N, K)
        self.scale = scale  # (N,)
        self.bias = None if bias is None else bias.detach()
        self.shape = tuple(weight.shape)

    def dequantize(self) -> torch.Tensor:
        """The weight this computes with, (N, K) float32."""
        return self.q.float() * self.scale.float()[:, None]

    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(_ACT).contiguous()
        return _finish(torch._weight_int8pack_mm(rows, self.q, self.scale), x, self.bias)


@dataclass(frozen=True)
class Int4Grid:
    """A weight given on int4's grid: ``w = (codes - 8) * scale + offset``, per ``INT4_GROUP`` columns."""

    codes: torch.Tensor  # (N, K) uint8, 0..15
    scale: torch.Tensor  # (N, K/G) float32
    offset: torch.Tensor  # (N, K/G) float32, the value of level 8

    @staticmethod
    def cat(grids: list[Int4Grid]) -> Int4Grid:
        """The grids' rows one after the other (a fused weight's)."""
        return Int4Grid(*(torch.cat([getattr(g, f) for g in grids]) for f in ("codes", "scale", "offset")))

    def dequantize(self) -> torch.Tensor:
        """The weight, (N, K) float32, as the file defines it (scales and offsets not rounded)."""
        n, k = self.codes.shape
        q = self.codes.float().reshape(n, k // INT4_GROUP, INT4_GROUP) - 8
        return (q * self.scale[..., None] + self.offset[..., None]).reshape(n, k)


class Int4Weight:
    """``y = x W^T + b`` with W in groups of ``group`` input columns: ``w = (q - 8) * scale + offset``,
    q in 0..15, scale and offset bfloat16 per (row, group). Built from a dense weight (quantized:
    each group's smallest and largest weights are levels 0 and 15) or from a grid (``from_grid``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group: int = INT4_GROUP) -> None:
        n, k = weight.shape
        if not can_int4(weight, group):
            raise ValueError(f"int4 needs output rows divisible by 16 and input columns by {group}, got {n}x{k}")
        w = weight.detach().float().reshape(n, k // group, group)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, K/G)
        scale = ((hi - lo) / 15).clamp_(min=1e-12).to(_ACT).float()  # as stored, so q is rounded against it
        offset = (lo + 8 * scale).to(_ACT).float()  # the value of level 8
        q = torch.round((w - offset[..., None]) / scale[..., None] + 8).clamp_(0, 15)
        self._pack(q.reshape(n, k), scale, offset, bias, group)

    @classmethod
    def from_grid(cls, grid: Int4Grid, bias: torch.Tensor | None = None) -> Int4Weight:
        """The weight of ``grid`` as it is (its codes; scales and offsets rounded to bfloat16)."""
        weight = cls.__new__(cls)
        weight._pack(grid.codes, grid.scale, grid.offset, bias, INT4_GROUP)
        return weight

    def _pack(
        self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bias: torch.Tensor | None, group: int
    ) -> None:
        self.group = group
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        self.scale_offset = torch.stack([scale, offset], dim=-1).transpose(0, 1).contiguous().to(_ACT)  # (K/G, N, 2)
        self.bias = None if bias is None else bias.detach()
        self.shape = tuple(q.shape)

    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale_offset.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(_ACT).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scale_offset)
        return _finish(y, x, self.bias)


QUANTIZED = (Fp16Weight, Int8Weight, Int4Weight)


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


def can_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> bool:
    n, k = weight.shape
    return n % 16 == 0 and k % group == 0


def quantized(weight: torch.Tensor, bias: torch.Tensor | None, mode: str, grid: Int4Grid | None = None):
    """The quantized replacement of one projection (int4 falls back to int8 where it cannot go; with
    the weight's own ``grid``, int4 packs that)."""
    if mode == "int4" and grid is not None and tuple(grid.codes.shape) == tuple(weight.shape):
        return Int4Weight.from_grid(grid, bias)
    if mode == "fp16":
        return Fp16Weight(weight, bias)
    if mode == "int4" and can_int4(weight):
        return Int4Weight(weight, bias)
    return Int8Weight(weight, bias)


def quantize_(model: Model, mode: str | None, grids: Mapping[str, Int4Grid] | None = None) -> Model:
    """Quantize ``model``'s projections in place (see the module doc); ``mode`` None leaves it as is.
    ``grids``: weights (by parameter name, e.g. ``model.layers.0.mlp.up_proj.weight``) already on
    int4's grid, which ``int4`` packs as they are (a fused weight, when all its parts have one).

    Runs once on a loaded model whose weights are final (after ``load_state``, sharding, fusing)."""
    from engine.models.common import Linear, PackedWeight

    mode = check_mode(mode)
    if mode is None:
        return model
    if getattr(model, "quant", None) is not None:
        raise ValueError(f"model is already quantized ({model.quant})")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError(f"quant {mode!r} runs on the CPU only")
    head = getattr(model, "lm_head", None)
    fused = [
        (module, name, value)
        for module in model.modules()
        for name, value in list(vars(module).items())
        if isinstance(value, PackedWeight) and not (isinstance(module, Linear) and name == "_packed")
    ]
    fused_storage = {value.weight.untyped_storage().data_ptr() for _, _, value in fused}
    grid_of = _grid_finder(model, grids or {})
    for module, name, value in fused:  # Llama's fused q/k/v and gate/up
        setattr(module, name, quantized(value.weight, value.bias, mode, grid_of(value.weight)))
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        if module.weight.untyped_storage().data_ptr() in fused_storage:
            module._packed = None  # a row slice of a fused weight: the fused one runs
        elif module is head:
            float32_logits_(model)
        else:
            module._packed = quantized(module.weight, module.bias, mode, grid_of(module.weight))
    model.quant = mode
    return model


def _grid_finder(model: nn.Module, grids: Mapping[str, Int4Grid]):
    """weight -> its grid: a parameter's own, or a fused weight's from the parameters that are its
    row slices (in row order); None where any part has none."""
    parts: dict[int, list[tuple[int | torch.SymInt, Int4Grid | None]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        parts.setdefault(param.untyped_storage().data_ptr(), []).append((param.storage_offset(), grids.get(name)))

    def grid_of(weight: torch.Tensor) -> Int4Grid | None:
        if not grids:
            return None
        given = sorted(parts.get(weight.untyped_storage().data_ptr(), []), key=lambda p: p[0])
        found = [grid for _, grid in given if grid is not None]
        if not found or len(found) < len(given):  # no part, or a part without a grid
            return None
        return found[0] if len(found) == 1 else Int4Grid.cat(found)

    return grid_of


def float32_logits_(model: Model) -> Model:
    """Give ``model``'s LM head (``model.lm_head``, a ``Linear``) float16 weights and float32
    arithmetic, so that it returns float32 logits whatever the model's dtype (a float32 dense copy
    where torch has no fp16 GEMM). ``quantize_`` does this; ``load_engine`` also does it for a
    bfloat16 or float16 model on the CPU."""
    head = model.lm_head
    if any(p.device.type != "cpu" for p in head.parameters()):
        raise ValueError("float32 logits from a float16 head run on the CPU only")
    if has_fp16_gemm():
        head._packed = Fp16Weight(head.weight, head.bias, out_dtype=torch.float32)
    else:
        w, b = head.weight.detach().float(), None if head.bias is None else head.bias.detach().float()
        head._packed = lambda x: torch.nn.functional.linear(x.float(), w, b)
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s quantized copies (codes, scales and offsets)."""
    return sum(
        value.nbytes() for module in model.modules() for value in vars(module).values() if isinstance(value, QUANTIZED)
    )
