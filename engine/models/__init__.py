"""Our torch implementations, one file per architecture."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from engine.models.gpt import GPT
    from engine.models.llama import Llama
    from engine.models.t5 import T5

# The models ``engine.loading.build_model`` makes; their ``kind`` tells them apart (a type checker
# narrows on ``model.kind == "t5"`` as on ``isinstance``).
DecoderOnly: TypeAlias = "Llama | GPT"
Model: TypeAlias = "Llama | GPT | T5"
