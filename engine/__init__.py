"""The inference engine: our own torch models, batched KV cache, hand-off.

``load_engine(model)`` is the entry point; the contract is in ``engine.api``. ``load_tokenizer(model)``
reads only the tokenizer and the context length (for front ends that never run the model).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.models import Model
    from engine.runners import Runner

TINY_MODELS = ("tiny-llama", "tiny-opt", "tiny-t5")
MODELS = ("smollm2", *TINY_MODELS)


def load_tokenizer(model: str, *, max_context: int | None = None, models_dir: str | Path | None = None):
    """``engine.model_info.ModelInfo`` of ``model`` (tokenizer, max_context, prompt_in_context): read
    without the weights and without torch. Same names and errors as ``load_engine``."""
    from engine.model_info import load_tokenizer as load

    return load(model, max_context=max_context, models_dir=models_dir)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r} (auto, cpu, cuda)")
    return device


def load_engine(
    model: str,
    *,
    device: str = "auto",
    dtype: str | None = None,
    num_threads: int | None = None,
    max_context: int | None = None,
    models_dir: str | Path | None = None,
    cuda_graphs: bool = False,
    quant: str | None = None,
):
    """An ``engine.api.Engine`` for ``model``: ``smollm2``, ``tiny-llama|tiny-opt|tiny-t5`` or a folder
    (Hugging Face layout) or a ``.gguf`` file. Raises ValueError naming the problem.

    dtype: ``float32`` (CPU default), ``bfloat16`` (CUDA default) or ``float16``.
    max_context: cap on prompt + generated tokens per request (default: the model's own limit).
    models_dir: where tiny models are written (default ``~/.cache/exegpt/models`` or $EXEGPT_MODELS_DIR).
    cuda_graphs: decode steps of the whole running batch replay CUDA graphs (``engine.cuda_graph``);
    decoder-only models on CUDA only, ignored elsewhere.
    quant: weight-only quantization of the projections, CPU only (``engine.quant``): ``fp16``, ``int8``,
    ``int4``, or ``none`` (the weights in ``dtype``). None (the default): a GGUF whose projections are
    stored as Q4_0/Q4_1 loads in that precision on the CPU (``int4`` on the file's codes, no dense
    copy: ``engine.native``); anything else as ``none``. ``int4`` on a GGUF loads so too.
    """
    import torch

    from engine.engine import LocalEngine
    from engine.loading import build_model, load_state
    from engine.runners import DecoderOnlyRunner

    if num_threads:
        torch.set_num_threads(num_threads)
    dev = resolve_device(device)
    torch_dtype = _dtype(dtype, dev)
    asked, quant = quant, check_quant(quant, dev)
    module: Model | None = None
    if is_gguf(model) and dev == "cpu" and (quant == "int4" or asked is None):  # the file's own precision
        from engine.native import load_native, read_native

        path = gguf_location(model)
        config, state, grids, tokenizer = read_native(path)
        model_type = "llama"
        if grids or quant == "int4":
            module, quant = load_native(config, state, grids, torch_dtype, path), "int4"
    else:
        model_type, config, state, tokenizer = read_checkpoint(model, models_dir)
    if module is None:
        module = load_state(build_model(model_type, config), state, torch_dtype, torch.device(dev), pack=quant is None)
        del state  # the weights the model did not take as they are (fused ones) go now
        precision_(module, quant, dev, torch_dtype)
    limit = module.max_positions()
    context = min(limit, max_context) if max_context else limit
    runner: Runner
    if module.kind == "t5":  # what model_type "t5" builds
        from engine.runners_t5 import EncoderDecoderRunner

        runner = EncoderDecoderRunner(module, device=torch.device(dev), dtype=torch_dtype, max_context=context)
    else:
        runner = DecoderOnlyRunner(
            module, device=torch.device(dev), dtype=torch_dtype, max_context=context, cuda_graphs=cuda_graphs
        )
    vocab = min(config["vocab_size"], tokenizer.vocab_size)
    return LocalEngine(runner, tokenizer, model_name=model, device=dev, vocab_size=vocab)


def is_gguf(model: str) -> bool:
    return model == "smollm2" or model.endswith(".gguf")


def gguf_location(model: str) -> Path:
    from engine.gguf_loader import smollm2_path

    return smollm2_path() if model == "smollm2" else Path(model)


def read_checkpoint(model: str, models_dir: str | Path | None = None, keep=None):
    """(model_type, config, state dict, tokenizer) of ``model`` (names as for ``load_engine``).
    ``keep(name)``: read only the tensors it accepts (Hugging Face names; a pipeline stage's own)."""
    from engine.loading import hf_tokenizer, read_hf_folder

    if model == "smollm2" or model.endswith(".gguf"):
        from engine.gguf_loader import read_gguf, smollm2_path

        config, state, tokenizer = read_gguf(smollm2_path() if model == "smollm2" else Path(model), keep)
        return "llama", config, state, tokenizer
    folder = _folder(model, models_dir)
    model_type, config, state = read_hf_folder(folder, keep)
    return model_type, config, state, hf_tokenizer(folder, config)


def checkpoint_layers(model: str, models_dir: str | Path | None = None) -> dict[str, int]:
    """Layers of each stack of ``model`` (``layers``; T5: ``encoder``, ``decoder``), from its
    config or GGUF metadata alone (no tensor is read)."""
    import json

    if model == "smollm2" or model.endswith(".gguf"):
        from engine.gguf_loader import read_gguf_tokenizer, smollm2_path

        meta, _ = read_gguf_tokenizer(smollm2_path() if model == "smollm2" else Path(model))
        return {"layers": int(meta["llama.block_count"])}
    path = _folder(model, models_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable config ({exc})") from exc
    if cfg.get("model_type") == "t5":
        return {"encoder": cfg["num_layers"], "decoder": cfg.get("num_decoder_layers") or cfg["num_layers"]}
    return {"layers": cfg.get("num_hidden_layers") or cfg.get("n_layer")}


def _folder(model: str, models_dir: str | Path | None) -> Path:
    from engine.tiny import default_dir, write_tiny

    if model in TINY_MODELS:
        folder = Path(models_dir) / model if models_dir else default_dir(model)
        return write_tiny(model, folder)
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"unknown model {model!r}: not one of {', '.join(MODELS)} and no such folder")
    if not path.is_dir():
        raise ValueError(f"model {model!r} is a file, expected a folder or a .gguf file")
    return path


def precision_(module, quant: str | None, device: str, dtype, grids=None) -> None:
    """After loading: the quantized projections of ``quant`` (checked by ``check_quant``; ``grids``:
    weights already on int4's grid, see ``engine.quant.quantize_``), or on the CPU float32 logits
    for a bfloat16/float16 model (low-precision logits make near ties exact ties or flip them)."""
    import torch

    if quant is not None:
        from engine.quant import quantize_

        quantize_(module, quant, grids)
    elif device == "cpu" and dtype in (torch.bfloat16, torch.float16) and hasattr(module, "lm_head"):
        from engine.quant import float32_logits_

        float32_logits_(module)


def check_quant(quant: str | None, device: str) -> str | None:
    """``quant`` as ``load_engine`` takes it (None for ``none``); ValueError for an unknown mode or a
    device the quantized kernels do not run on."""
    from engine.quant import check_mode

    mode = check_mode(quant)
    if mode is not None and not device.startswith("cpu"):
        raise ValueError(f"quant {mode!r} runs on the CPU only, not on {device!r} (use --dtype there)")
    return mode


def _dtype(name: str | None, device: str):
    import torch

    if name is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "float64": torch.float64,
    }
    if name not in table:
        raise ValueError(f"unknown dtype {name!r} (float32, bfloat16, float16; float64 for exact checks)")
    return table[name]
