"""Tiny random-weight models for tests and stress runs, written as real Hugging Face folders.

Weights come from a fixed seed, so every process that writes ``tiny-llama`` writes the same bytes;
the folder is written to a temporary name and renamed into place, so concurrent writers are safe.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from engine.tokenizer import CHATML, byte_tokenizer

if TYPE_CHECKING:  # torch is imported only to write a model, so reading a written one's tokenizer needs none
    import torch

TINY_VERSION = 1  # bump when configs or weights change: stale folders are then rewritten
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 256, 257, 258
EOS_ID, BOS_ID = 256, 256
VOCAB = 256 + len(SPECIAL)


def default_dir(name: str) -> Path:
    root = os.environ.get("EXEGPT_MODELS_DIR") or Path.home() / ".cache" / "exegpt" / "models"
    return Path(root) / name


def _llama_config() -> dict[str, Any]:
    from engine.models.llama import ModelArgs

    return ModelArgs(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                     rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                     bos_token_id=BOS_ID, eos_token_id=EOS_ID).to_hf_config()


def _opt_config() -> dict[str, Any]:
    return {
        "architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": VOCAB, "hidden_size": 64,
        "word_embed_proj_dim": 64, "ffn_dim": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "max_position_embeddings": 2048, "do_layer_norm_before": True, "activation_function": "relu",
        "enable_bias": True, "layer_norm_elementwise_affine": True, "dropout": 0.0, "attention_dropout": 0.0,
        "tie_word_embeddings": True, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": 258,
        "torch_dtype": "float32",
    }


def _t5_config() -> dict[str, Any]:
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": VOCAB, "d_model": 64,
        "d_kv": 16, "d_ff": 128, "num_layers": 3, "num_decoder_layers": 3, "num_heads": 4,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu", "tie_word_embeddings": True,
        "dropout_rate": 0.0, "is_encoder_decoder": True, "decoder_start_token_id": 258,
        "pad_token_id": 258, "eos_token_id": EOS_ID, "n_positions": 2048, "torch_dtype": "float32",
    }


CONFIGS: dict[str, Callable[[], dict[str, Any]]] = {
    "tiny-llama": _llama_config,
    "tiny-opt": _opt_config,
    "tiny-t5": _t5_config,
}


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic weights: embeddings N(0, 1), matrices N(0, 9/fan_in), norms 1, biases small.

    Matrices are deliberately large: with tied N(0, 1) embeddings and a weak residual branch, a
    random model just repeats its last input token, which would make batching tests vacuous.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    tied = set(getattr(model, "tied_weights", {}))
    for name, p in model.state_dict().items():
        if name in tied:
            continue
        shape = tuple(p.shape)
        if "norm" in name or "layer_norm" in name:
            t = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        elif name.endswith("bias"):
            t = torch.randn(shape, generator=gen) * 0.02
        elif "embed" in name or "shared" in name or len(shape) == 1:
            t = torch.randn(shape, generator=gen)
        elif "relative_attention_bias" in name:
            t = torch.randn(shape, generator=gen) * 0.5
        else:
            t = torch.randn(shape, generator=gen) * (3.0 / shape[-1] ** 0.5)
        state[name] = t.contiguous()
    return state


def write_tiny(name: str, folder: Path) -> Path:
    """Write the tiny model ``name`` to ``folder`` (if not already there) and return the folder."""
    if name not in CONFIGS:
        raise ValueError(f"unknown tiny model {name!r} ({', '.join(CONFIGS)})")
    folder = Path(folder)
    if _is_current(folder):
        return folder
    from safetensors.torch import save_file

    from engine.loading import build_model

    config = {**CONFIGS[name](), "exegpt_tiny_version": TINY_VERSION}
    model = build_model(config["model_type"], config)
    state = random_state(model, seed=sum(map(ord, name)))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    stale = tmp.with_name(tmp.name + "-stale")
    try:
        os.chmod(tmp, 0o755)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        byte_tokenizer(SPECIAL).save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SPECIAL[0], "bos_token": SPECIAL[0],
            "pad_token": SPECIAL[2], "chat_template": CHATML, "model_max_length": 2048,
        }, indent=2))
        keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
        (tmp / "generation_config.json").write_text(json.dumps({k: config[k] for k in keys if k in config}))
        if folder.exists() and not _is_current(folder):
            try:
                os.rename(folder, stale)  # an older version: move it aside, ours replaces it
            except OSError:
                pass  # another process moved it first
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first
            if not _is_current(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    return folder


def _is_current(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("exegpt_tiny_version") == TINY_VERSION and (folder / "model.safetensors").is_file()
