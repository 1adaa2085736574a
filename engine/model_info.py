"""What a front end or a planner needs to know about a model, read without its weights (and
without torch).

A gateway tokenizes prompts and checks them against the context; building the engine for that would
read every weight. ``load_tokenizer`` reads only the tokenizer and the configuration: GGUF metadata
(``engine.gguf_file`` maps the file and leaves tensors alone), or ``tokenizer.json`` + ``config.json``
of a Hugging Face folder (tiny models are written first if missing, as ``load_engine`` does).
``model_dimensions`` reads the same configuration for the layer shapes the optimizer plans with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.tokenizer import TextTokenizer, hf_tokenizer


@dataclass(frozen=True)
class ModelInfo:
    name: str  # the model as given to load_tokenizer
    tokenizer: TextTokenizer  # the same tokenizer load_engine builds
    max_context: int  # prompt + generated tokens one request may hold (the engine's max_context)
    prompt_in_context: bool  # whether the prompt counts towards max_context (encoder-decoder: no)


def load_tokenizer(model: str, *, max_context: int | None = None, models_dir: str | Path | None = None) -> ModelInfo:
    """Tokenizer and context of ``model`` (names as ``load_engine`` takes them); ValueError names the problem."""
    if model == "smollm2" or model.endswith(".gguf"):
        from engine.gguf_loader import read_gguf_tokenizer, smollm2_path

        meta, tokenizer = read_gguf_tokenizer(smollm2_path() if model == "smollm2" else Path(model))
        model_type, limit = "llama", int(meta["llama.context_length"])
    else:
        from engine import _folder

        folder = _folder(model, models_dir)
        config = _read_config(folder)
        model_type = config.get("model_type", "")
        limit, tokenizer = context_limit(model_type, config), hf_tokenizer(folder, config)
    context = min(limit, max_context) if max_context else limit
    return ModelInfo(model, tokenizer, context, prompt_in_context=model_type != "t5")


@dataclass(frozen=True)
class ModelDimensions:
    """A model's layer shapes, as its configuration states them (the optimizer's ``ModelShape``)."""

    model_type: str  # llama | opt | gpt2 | t5
    layers: int  # decoder layers (all layers of a decoder-only model)
    hidden: int
    heads: int
    kv_heads: int  # key/value heads (< heads: grouped-query attention)
    head_dim: int
    ffn: int
    vocab: int
    encoder_layers: int = 0  # T5
    gated_ffn: bool = False  # gate + up + down projections (Llama, T5 v1.1)
    max_context: int = 0


def model_dimensions(model: str, *, models_dir: str | Path | None = None) -> ModelDimensions:
    """Layer shapes of ``model`` (names as ``load_engine`` takes them) from GGUF metadata or
    ``config.json``, without reading weights; ValueError names the problem."""
    if model == "smollm2" or model.endswith(".gguf"):
        from engine.gguf_loader import _open_llama, smollm2_path

        reader, meta = _open_llama(smollm2_path() if model == "smollm2" else Path(model))
        return _gguf_dimensions(meta, len(reader.metadata["tokenizer.ggml.tokens"]))
    from engine import _folder

    config = _read_config(_folder(model, models_dir))
    try:
        return _config_dimensions(config.get("model_type", ""), config)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{model}: config.json lacks a usable {exc}") from None


def _gguf_dimensions(meta: dict[str, Any], tokens: int) -> ModelDimensions:
    heads, hidden = int(meta["llama.attention.head_count"]), int(meta["llama.embedding_length"])
    head_dim = int(meta.get("llama.rope.dimension_count") or hidden // heads)
    return ModelDimensions(
        "llama",
        int(meta["llama.block_count"]),
        hidden,
        heads,
        int(meta.get("llama.attention.head_count_kv") or heads),
        head_dim,
        int(meta["llama.feed_forward_length"]),
        int(meta.get("llama.vocab_size") or tokens),
        gated_ffn=True,
        max_context=int(meta["llama.context_length"]),
    )


def _config_dimensions(model_type: str, c: dict[str, Any]) -> ModelDimensions:
    limit = context_limit(model_type, c)
    if model_type == "llama":
        heads, hidden = int(c["num_attention_heads"]), int(c["hidden_size"])
        return ModelDimensions(
            "llama",
            int(c["num_hidden_layers"]),
            hidden,
            heads,
            int(c.get("num_key_value_heads") or heads),
            int(c.get("head_dim") or hidden // heads),
            int(c["intermediate_size"]),
            int(c["vocab_size"]),
            gated_ffn=True,
            max_context=limit,
        )
    if model_type == "opt":
        heads, hidden = int(c["num_attention_heads"]), int(c["hidden_size"])
        return ModelDimensions(
            "opt",
            int(c["num_hidden_layers"]),
            hidden,
            heads,
            heads,
            hidden // heads,
            int(c["ffn_dim"]),
            int(c["vocab_size"]),
            max_context=limit,
        )
    if model_type == "gpt2":
        heads, hidden = int(c["n_head"]), int(c["n_embd"])
        return ModelDimensions(
            "gpt2",
            int(c["n_layer"]),
            hidden,
            heads,
            heads,
            hidden // heads,
            int(c.get("n_inner") or 4 * hidden),
            int(c["vocab_size"]),
            max_context=limit,
        )
    heads = int(c["num_heads"])  # t5 (context_limit rejected anything else)
    encoder = int(c["num_layers"])
    return ModelDimensions(
        "t5",
        int(c.get("num_decoder_layers") or encoder),
        int(c["d_model"]),
        heads,
        heads,
        int(c["d_kv"]),
        int(c["d_ff"]),
        int(c["vocab_size"]),
        encoder_layers=encoder,
        gated_ffn=str(c.get("feed_forward_proj", "relu")).startswith("gated-"),
        max_context=limit,
    )


def context_limit(model_type: str, config: dict[str, Any]) -> int:
    """The positions a model of this Hugging Face config handles (each module's ``max_positions()``)."""
    if model_type == "llama":
        return int(config.get("max_position_embeddings", 2048))
    if model_type == "opt":
        return int(config["max_position_embeddings"])
    if model_type == "gpt2":
        return int(config["n_positions"])
    if model_type == "t5":
        return int(config.get("n_positions", 512))
    raise ValueError(f"unsupported model_type {model_type!r} (llama, opt, gpt2, t5)")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from exc
