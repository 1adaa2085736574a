from __future__ import annotations

import pytest

from engine import load_engine
from engine.api import SamplingParams
from tests.engine.conftest import req


@pytest.mark.parametrize(
    "prompt, match",
    [
        ((), "empty prompt"),
        (tuple(range(2048)), "max_context"),
        ((1, 2, 99999), "outside vocabulary"),
        ((-1,), "outside vocabulary"),
    ],
)
def test_bad_prompts_rejected_and_batch_untouched(llama, prompt, match):
    llama.prefill([req("ok", b"fine", max_tokens=5)])
    with pytest.raises(ValueError, match=match):
        llama.prefill([req("good", b"also fine"), req("bad", prompt)])
    assert llama.running() == ["ok"]


def test_duplicate_ids_rejected(llama):
    llama.prefill([req("x", b"one", max_tokens=5)])
    with pytest.raises(ValueError, match="already running"):
        llama.prefill([req("x", b"two")])
    with pytest.raises(ValueError, match="repeated"):
        llama.prefill([req("y", b"a"), req("y", b"b")])


def test_bad_sampling_params_rejected():
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


@pytest.mark.parametrize(
    "model, match",
    [
        ("no-such-model", "unknown model"),
        ("/nonexistent/folder", "unknown model"),
    ],
)
def test_unknown_models_rejected(model, match):
    with pytest.raises(ValueError, match=match):
        load_engine(model, device="cpu")


def test_folder_without_weights_rejected(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="safetensors"):
        load_engine(str(tmp_path), device="cpu")


def test_bad_gguf_rejected(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="GGUF"):
        load_engine(str(bad), device="cpu")


def test_tiny_tokenizer_round_trips(llama):
    text = "héllo wörld 123 \n\t ✓ 🎉 <b>"
    ids = llama.tokenizer.encode(text)
    assert llama.tokenizer.decode(ids) == text
    assert "<|im_start|>assistant\n" in llama.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_tiny_models_are_written_once_and_stale_ones_replaced(tmp_path):
    import json

    from engine.tiny import write_tiny

    folder = write_tiny("tiny-llama", tmp_path / "tiny-llama")
    weights = (folder / "model.safetensors").read_bytes()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert write_tiny("tiny-llama", folder) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "exegpt_tiny_version": 0}))
    (folder / "model.safetensors").write_bytes(b"old")
    write_tiny("tiny-llama", folder)
    assert (folder / "model.safetensors").read_bytes() == weights  # deterministic rewrite
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama"]  # no temporary folders left
