"""Model shapes for planning, read from the models' own configuration (no weights), agree with the
engine that runs them: the optimizer's KV bytes per token are the engine's cache bytes per position."""

from __future__ import annotations

import pytest

from engine.model_info import model_dimensions
from services.scheduler.planning import PlanningError, model_shape
from tests.brokers import need_smollm2


def _module_dims(engine):
    model = engine.runner.model
    a = model.args
    if model.kind == "llama":
        return (
            a.num_hidden_layers,
            a.hidden_size,
            a.num_attention_heads,
            a.num_key_value_heads,
            a.head_dim,
            a.intermediate_size,
            0,
        )
    if model.kind == "t5":
        return a.num_decoder_layers, a.d_model, a.num_heads, a.num_heads, a.d_kv, a.d_ff, a.num_layers
    return a.num_hidden_layers, a.hidden_size, a.num_attention_heads, a.num_attention_heads, a.head_dim, a.ffn_dim, 0


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-t5"])
def test_tiny_model_dimensions_match_the_loaded_module(name, make_engine, models_dir):
    engine = make_engine(name)
    d = model_dimensions(name, models_dir=models_dir)
    assert (d.layers, d.hidden, d.heads, d.kv_heads, d.head_dim, d.ffn, d.encoder_layers) == _module_dims(engine)
    assert d.vocab == engine.runner.model.args.vocab_size and d.max_context == engine.max_context
    assert d.gated_ffn == (name == "tiny-llama")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-t5"])
def test_plan_shape_counts_the_engines_kv_bytes(name, make_engine, models_dir, monkeypatch):
    monkeypatch.setenv("EXEGPT_MODELS_DIR", str(models_dir))
    engine, shape = make_engine(name), model_shape(name, dtype_bytes=4)
    assert shape.name == name and shape.kv_heads == _module_dims(engine)[3]
    assert shape.kv_bytes_per_token_layer * shape.layers == engine.kv_bytes_per_token


def test_unknown_models_are_one_clear_error():
    with pytest.raises(PlanningError, match="unknown model 'llama': not a paper model .* nor one of ours"):
        model_shape("llama")


@pytest.mark.smollm2
def test_smollm2_shape_from_its_gguf_uses_grouped_query_heads():
    need_smollm2()
    d = model_dimensions("smollm2")
    assert (d.layers, d.hidden, d.heads, d.kv_heads, d.head_dim, d.ffn, d.vocab) == (30, 576, 9, 3, 64, 1536, 49152)
    shape = model_shape("smollm2", dtype_bytes=4)
    assert shape.kv_bytes_per_token_layer * shape.layers == 30 * 2 * 3 * 64 * 4  # 46 KB per token, float32
