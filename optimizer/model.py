"""Models described by shape: enough to count KV-cache and weight bytes and message sizes.

``MODELS`` holds the paper's models (fp16). Our own models' shapes are read from the models
themselves (``services.scheduler.planning.model_shape`` over
``engine.model_info.model_dimensions``), since this package reads no files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


@dataclass(frozen=True)
class ModelShape:
    """A transformer by its dimensions. ``encoder_layers > 0`` means encoder-decoder (T5)."""

    name: str
    layers: int  # decoder layers (all layers of a decoder-only model)
    hidden: int
    heads: int
    ffn: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    encoder_layers: int = 0
    dtype_bytes: int = 2
    kv_heads: int = 0  # key/value heads (grouped-query attention); 0: = heads
    gated_ffn: bool = False  # three FFN matrices (gate, up, down: Llama, T5 v1.1) instead of two

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "ffn", "vocab", "dtype_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {self.name!r}: {name} must be >= 1, got {getattr(self, name)!r}")
        if self.head_dim < 0 or self.encoder_layers < 0:
            raise ValueError(f"model {self.name!r}: head_dim and encoder_layers must be >= 0")
        if self.kv_heads < 0 or (self.kv_heads and self.heads % self.kv_heads):
            raise ValueError(f"model {self.name!r}: kv_heads must divide heads ({self.heads}), got {self.kv_heads}")

    @property
    def attn_dim(self) -> int:
        """Width of the queries (heads x head dim)."""
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        """Width of the keys and of the values (KV heads x head dim)."""
        return (self.kv_heads or self.heads) * (self.head_dim or self.hidden // self.heads)

    @property
    def prefill_layers(self) -> int:
        """Layers a prompt passes through: the encoder's, or the decoder's for decoder-only."""
        return self.encoder_layers or self.layers

    @property
    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.kv_dim * self.dtype_bytes

    def kv_bytes_per_request_layer(self, input_len: float, output_len: float) -> float:
        """Decoder-layer KV of one request: self-attention over input+output positions, or, for
        T5, self-attention over the output plus cross-attention over the encoder's input."""
        return self.kv_bytes_per_token_layer * (input_len + output_len)

    def _attention_weights(self) -> int:
        return 2 * self.hidden * (self.attn_dim + self.kv_dim)  # q and o; k and v

    def _ffn_weights(self) -> int:
        return (3 if self.gated_ffn else 2) * self.hidden * self.ffn

    def decoder_layer_weight_bytes(self) -> int:
        attn = self._attention_weights() * (2 if self.encoder_layers else 1)  # T5: + cross-attention
        return (attn + self._ffn_weights()) * self.dtype_bytes

    def encoder_layer_weight_bytes(self) -> int:
        return (self._attention_weights() + self._ffn_weights()) * self.dtype_bytes

    def embedding_bytes(self) -> int:
        return self.vocab * self.hidden * self.dtype_bytes

    @overload
    def activation_bytes(self, tokens: float) -> float: ...
    @overload
    def activation_bytes(self, tokens: npt.NDArray[Any]) -> npt.NDArray[np.float64]: ...
    def activation_bytes(self, tokens: float | npt.NDArray[Any]) -> float | npt.NDArray[np.float64]:
        """One hidden-state tensor for ``tokens`` tokens: a TP all-reduce or pipeline message."""
        return tokens * self.hidden * self.dtype_bytes


def _gpt(name: str, layers: int, hidden: int, heads: int, vocab: int = 50272) -> ModelShape:
    return ModelShape(name, layers=layers, hidden=hidden, heads=heads, ffn=4 * hidden, vocab=vocab)


MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        _gpt("opt-1.3b", 24, 2048, 32),
        _gpt("opt-13b", 40, 5120, 40),
        _gpt("opt-66b", 64, 9216, 72),
        _gpt("gpt3-39b", 48, 8192, 64, vocab=50257),
        _gpt("gpt3-101b", 80, 10240, 80, vocab=50257),
        _gpt("gpt3-175b", 96, 12288, 96, vocab=50257),
        _gpt("gpt3-341b", 120, 15360, 120, vocab=50257),
        ModelShape(
            "t5-11b", layers=24, encoder_layers=24, hidden=1024, heads=128, head_dim=128, ffn=65536, vocab=32128
        ),
    )
}


def model_by_name(name: str) -> ModelShape:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None
