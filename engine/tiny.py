"""Random-weight models for tests, stress runs and GPU checks, written as real Hugging Face folders.

``write_tiny``: the tiny models (``tiny-llama``, ``tiny-opt``, ``tiny-t5``). ``write_random_llama``:
a Llama of a real model's shape (``RANDOM_LLAMA_SHAPES``: SmolLM2-135M's, Llama-3.2-1B's) with
random weights, for timing and numerical checks where the real weights are not at hand.

Weights come from a fixed seed, so every process that writes ``tiny-llama`` writes the same bytes;
the folder is written to a temporary name and renamed into place, so concurrent writers are safe.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

    return ModelArgs(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    ).to_hf_config()


def _opt_config() -> dict[str, Any]:
    return {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "word_embed_proj_dim": 64,
        "ffn_dim": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 2048,
        "do_layer_norm_before": True,
        "activation_function": "relu",
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": 258,
        "torch_dtype": "float32",
    }


def _t5_config() -> dict[str, Any]:
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": VOCAB,
        "d_model": 64,
        "d_kv": 16,
        "d_ff": 128,
        "num_layers": 3,
        "num_decoder_layers": 3,
        "num_heads": 4,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "relu",
        "tie_word_embeddings": True,
        "dropout_rate": 0.0,
        "is_encoder_decoder": True,
        "decoder_start_token_id": 258,
        "pad_token_id": 258,
        "eos_token_id": EOS_ID,
        "n_positions": 2048,
        "torch_dtype": "float32",
    }


CONFIGS: dict[str, Callable[[], dict[str, Any]]] = {
    "tiny-llama": _llama_config,
    "tiny-opt": _opt_config,
    "tiny-t5": _t5_config,
}


def random_state(
    model: torch.nn.Module, seed: int, *, gain: float = 3.0, device: str = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Deterministic weights: embeddings N(0, 1), matrices N(0, gain^2/fan_in), norms 1, biases small.

    Matrices are deliberately large for the tiny models (gain 3): with tied N(0, 1) embeddings and
    a weak residual branch, a few-layer random model just repeats its last input token, which would
    make batching tests vacuous. Deep models need gain 1: at gain 3 each layer multiplies
    perturbations, and 30 layers turn float rounding into different tokens.
    ``model`` only gives names and shapes (it may live on the meta device). ``device``: where the
    numbers are drawn (its own generator: the same seed gives other numbers on CUDA than on the CPU);
    ``dtype``: each tensor is converted as soon as it is drawn (default: float32).
    """
    import torch

    gen = torch.Generator(device).manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    tied = set(getattr(model, "tied_weights", {}))
    for name, p in model.state_dict().items():
        if name in tied:
            continue
        shape = tuple(p.shape)
        if "norm" in name or "layer_norm" in name:
            t = torch.ones(shape, device=device) if name.endswith("weight") else torch.zeros(shape, device=device)
        elif name.endswith("bias"):
            t = torch.randn(shape, generator=gen, device=device) * 0.02
        elif "embed" in name or "shared" in name or len(shape) == 1:
            t = torch.randn(shape, generator=gen, device=device)
        elif "relative_attention_bias" in name:
            t = torch.randn(shape, generator=gen, device=device) * 0.5
        else:
            t = torch.randn(shape, generator=gen, device=device) * (gain / shape[-1] ** 0.5)
        state[name] = (t if dtype is None else t.to(dtype)).contiguous()
    return state


def write_tiny(name: str, folder: Path) -> Path:
    """Write the tiny model ``name`` to ``folder`` (if not already there) and return the folder."""
    if name not in CONFIGS:
        raise ValueError(f"unknown tiny model {name!r} ({', '.join(CONFIGS)})")
    folder = Path(folder)
    if _is_current(folder):
        return folder
    from engine.loading import build_model

    config = {**CONFIGS[name](), "exegpt_tiny_version": TINY_VERSION}
    model = build_model(config["model_type"], config)
    state = random_state(model, seed=sum(map(ord, name)))
    return _write_folder(folder, config, state, 2048, _is_current)


def _write_folder(
    folder: Path,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    max_length: int,
    is_current: Callable[[Path], bool],
) -> Path:
    """Write a model folder (weights, config, byte-level tokenizer with ChatML) under a temporary name
    and rename it into place; a folder that ``is_current`` rejects is replaced."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    stale = tmp.with_name(tmp.name + "-stale")
    try:
        os.chmod(tmp, 0o755)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        byte_tokenizer(SPECIAL).save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "eos_token": SPECIAL[0],
                    "bos_token": SPECIAL[0],
                    "pad_token": SPECIAL[2],
                    "chat_template": CHATML,
                    "model_max_length": max_length,
                },
                indent=2,
            )
        )
        keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
        (tmp / "generation_config.json").write_text(json.dumps({k: config[k] for k in keys if k in config}))
        if folder.exists() and not is_current(folder):
            try:
                os.rename(folder, stale)  # an older version: move it aside, ours replaces it
            except OSError:
                pass  # another process moved it first
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first
            if not is_current(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    return folder


# Llama shapes of real models, for random-weight stand-ins (``write_random_llama``): the dimensions,
# vocabulary size and tied head of the real model; RoPE is the default type (Llama 3.2's own scaling
# is not modelled: it changes no shape and no cost).
RANDOM_LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
}
RANDOM_LLAMA_VERSION = 1  # bump when the weights drawn for a shape change


def random_llama_config(shape: str | dict[str, Any]) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of a named shape (``RANDOM_LLAMA_SHAPES``) or of a dict of
    ``engine.models.llama.ModelArgs`` fields; the byte-level tokenizer's ids for bos/eos."""
    from engine.models.llama import ModelArgs

    if isinstance(shape, str):
        if shape not in RANDOM_LLAMA_SHAPES:
            raise ValueError(f"unknown Llama shape {shape!r} ({', '.join(RANDOM_LLAMA_SHAPES)})")
        shape = RANDOM_LLAMA_SHAPES[shape]
    fields = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, **shape}
    if fields["vocab_size"] < VOCAB:
        raise ValueError(f"vocab_size {fields['vocab_size']} is smaller than the byte tokenizer's {VOCAB}")
    return ModelArgs(**fields).to_hf_config()


def random_llama_parameters(shape: str | dict[str, Any]) -> int:
    """Parameters of a shape (a tied head counted once), from a model built on the meta device."""
    import torch

    from engine.loading import build_model

    with torch.device("meta"):
        model = build_model("llama", random_llama_config(shape))
    return sum(p.numel() for p in model.parameters())


def write_random_llama(
    folder: str | Path,
    shape: str | dict[str, Any],
    *,
    dtype: str = "bfloat16",
    device: str = "cpu",
    seed: int | None = None,
) -> Path:
    """Write a random-weight Llama of ``shape`` (a name in ``RANDOM_LLAMA_SHAPES`` or a dict of
    ``ModelArgs`` fields) to ``folder`` unless the same one is already there; return the folder.

    Weights as ``random_state`` draws them with gain 1 (seed: from the shape's name, or ``seed``),
    stored in ``dtype``; ``device``: where they are drawn (``cuda`` is much faster for 1B
    parameters). The tokenizer is the tiny models' byte-level one (259 tokens; ids above it decode
    to nothing), so prompts are bytes and any model id can be generated."""
    import torch

    from engine.loading import build_model

    folder = Path(folder)
    config = random_llama_config(shape)
    name = shape if isinstance(shape, str) else json.dumps(shape, sort_keys=True)
    seed = sum(map(ord, name)) if seed is None else seed
    marker = {
        "shape": name,
        "version": RANDOM_LLAMA_VERSION,
        "dtype": dtype,
        "rng": torch.device(device).type,
        "seed": seed,
    }
    config = {**config, "torch_dtype": dtype, "exegpt_random_llama": marker}

    def is_current(path: Path) -> bool:
        try:
            written = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return False
        return written.get("exegpt_random_llama") == marker and (path / "model.safetensors").is_file()

    if is_current(folder):
        return folder
    with torch.device("meta"):
        model = build_model("llama", config)
    state = random_state(model, seed, gain=1.0, device=device, dtype=getattr(torch, dtype))
    state = {k: v.cpu() for k, v in state.items()}
    return _write_folder(folder, config, state, config["max_position_embeddings"], is_current)


def _is_current(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("exegpt_tiny_version") == TINY_VERSION and (folder / "model.safetensors").is_file()
