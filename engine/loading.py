"""Building models from files: Hugging Face folders (config.json + *.safetensors + tokenizer.json).

Modules are built with uninitialised weights (``engine.models.common.Linear``/``Embedding``) and
receive the loaded tensors directly, so loading costs one read of the weights and no random
initialisation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from engine.tokenizer import hf_tokenizer  # noqa: F401  (re-exported: the loader's tokenizer)

if TYPE_CHECKING:
    from engine.models import Model
    from engine.models.llama import Llama


@overload
def build_model(model_type: Literal["llama"], config: dict[str, Any]) -> Llama: ...
@overload
def build_model(model_type: str, config: dict[str, Any]) -> Model: ...
def build_model(model_type: str, config: dict[str, Any]) -> Model:
    if model_type == "llama":
        from engine.models.llama import Llama, ModelArgs

        return Llama(ModelArgs.from_hf_config(config))
    if model_type in ("opt", "gpt2"):
        from engine.models import gpt

        return gpt.model_from_hf_config(model_type, config)
    if model_type == "t5":
        from engine.models.t5 import T5
        from engine.models.t5 import ModelArgs as T5Args

        return T5(T5Args.from_hf_config(config))
    raise ValueError(f"unsupported model_type {model_type!r} (llama, opt, gpt2, t5)")


def load_state(
    model: Model,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    prepare: Callable[[Model], None] | None = None,
    *,
    pack: bool = True,
) -> Model:
    """Load ``state`` into a freshly built model (names as Hugging Face saves them). ``prepare`` runs on
    the loaded model before its projections are fused (``engine.parallel`` shards it there).
    ``pack`` False: no oneDNN-packed copies (``quantize_`` gives the projections their own)."""
    state = {k: v for k, v in state.items() if not k.endswith(".rotary_emb.inv_freq")}
    adapt = getattr(model, "adapt_state_dict", None)  # a model's own fix-ups (GPT-2's names, T5's copies)
    state = adapt(state) if adapt is not None else state
    expected = set(model.state_dict())
    tied = getattr(model, "tied_weights", {})
    for name, source in tied.items():
        if name not in state and source in state:
            state[name] = state[source]
    missing = sorted(expected - state.keys())
    if missing:
        raise ValueError(
            f"weights missing from the checkpoint: {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items() if k in expected}
    model.load_state_dict(state, assign=True, strict=True)
    for name, source in tied.items():  # assign=True broke the sharing; restore it
        set_param(model, name, model.get_parameter(source))
    model = model.eval().requires_grad_(False)
    if prepare is not None:
        prepare(model)
    fuse = getattr(model, "fuse_", None)  # the decoder-only models fuse and pack their projections
    return fuse(pack) if fuse is not None else model


def set_param(model: nn.Module, name: str, param: nn.Parameter) -> None:
    """Make the parameter at dotted ``name`` be ``param`` (tied weights share one)."""
    owner_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner_name), attr, param)


def read_hf_folder(
    folder: Path, keep: Callable[[str], bool] | None = None
) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(model_type, config, state dict) of a Hugging Face folder; ValueError names what is wrong.
    ``keep``: read only the tensors whose names it accepts (a pipeline stage's own)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder}: no config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path}: not JSON ({exc})") from exc
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if keep is None:
                state.update(load_file(str(f)))
            else:
                with safe_open(str(f), framework="pt") as handle:
                    state.update({name: handle.get_tensor(name) for name in handle.keys() if keep(name)})
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{f}: unreadable safetensors file ({exc})") from exc
    return config.get("model_type", ""), config, state
