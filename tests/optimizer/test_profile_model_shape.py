"""ModelShape with grouped-query attention and gated FFNs: KV and weight bytes."""

import pytest

from optimizer.model import MODELS, ModelShape

# SmolLM2-135M as its GGUF states it: 9 query heads share 3 KV heads; float32 on CPU
SMOLLM2 = ModelShape(
    "smollm2",
    layers=30,
    hidden=576,
    heads=9,
    ffn=1536,
    vocab=49152,
    head_dim=64,
    dtype_bytes=4,
    kv_heads=3,
    gated_ffn=True,
)


def test_kv_bytes_use_the_kv_heads():
    assert SMOLLM2.kv_dim == 3 * 64 and SMOLLM2.attn_dim == 576
    assert SMOLLM2.kv_bytes_per_token_layer == 2 * 3 * 64 * 4  # keys and values, float32
    full = ModelShape("mha", layers=30, hidden=576, heads=9, ffn=1536, vocab=49152, head_dim=64, dtype_bytes=4)
    assert full.kv_bytes_per_token_layer == 3 * SMOLLM2.kv_bytes_per_token_layer


def test_weight_bytes_count_gqa_projections_and_gated_ffn():
    per_layer = (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536) * 4
    assert SMOLLM2.decoder_layer_weight_bytes() == per_layer
    assert 30 * per_layer + SMOLLM2.embedding_bytes() == pytest.approx(4 * 134.5e6, rel=0.01)  # 135M params


def test_paper_models_are_unchanged():
    opt = MODELS["opt-13b"]
    assert opt.kv_dim == opt.attn_dim == 5120 and opt.kv_bytes_per_token_layer == 2 * 5120 * 2
    assert opt.decoder_layer_weight_bytes() == (4 * 5120 * 5120 + 2 * 5120 * 20480) * 2


@pytest.mark.parametrize("kv_heads", [-1, 4])
def test_kv_heads_must_divide_heads(kv_heads):
    with pytest.raises(ValueError, match="kv_heads must divide heads"):
        ModelShape("x", layers=1, hidden=576, heads=9, ffn=1, vocab=1, kv_heads=kv_heads)
