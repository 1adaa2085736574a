"""What a front end needs to know about a model, read without its weights (and without torch).

A gateway tokenizes prompts and checks them against the context; building the engine for that would
read every weight. ``load_tokenizer`` reads only the tokenizer and the configuration: GGUF metadata
(``gguf.GGUFReader`` maps the file and leaves tensors alone), or ``tokenizer.json`` + ``config.json``
of a Hugging Face folder (tiny models are written first if missing, as ``load_engine`` does).
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


def load_tokenizer(model: str, *, max_context: int | None = None,
                   models_dir: str | Path | None = None) -> ModelInfo:
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
